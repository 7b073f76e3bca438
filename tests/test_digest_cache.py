"""The digest cache: a large file hashed once is not read again until it is written."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from umtam import atomic, base_model, digest_cache
from umtam.errors import CheckpointError
from umtam.models import resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(digest_cache.CACHE_ENV, str(directory))
    monkeypatch.setattr(digest_cache, "MIN_BYTES", 0)  # the tests' files are small
    return directory


@pytest.fixture
def counted(monkeypatch):
    """How many times a file's bytes were read to hash them."""
    reads = []
    original = atomic._sha256_of

    def counting(handle):
        reads.append(handle.name)
        return original(handle)

    monkeypatch.setattr(atomic, "_sha256_of", counting)
    return reads


def test_a_file_hashed_once_is_not_read_again(cache, counted, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"umtam" * 1000)
    first, identity = atomic.hash_identified(path)
    second, again = atomic.hash_identified(path)
    assert first == second == hashlib.sha256(b"umtam" * 1000).hexdigest()
    assert identity == again
    assert counted == [str(path)]
    assert len(json.loads((cache / digest_cache.CACHE_FILE).read_text())["digests"]) == 1


def test_a_file_rewritten_with_its_mtime_put_back_is_hashed_again(cache, counted, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    atomic.hash_identified(path)
    info = os.stat(path)
    path.write_bytes(b"b" * 4096)  # same size
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))  # same mtime: only ctime tells
    digest, _ = atomic.hash_identified(path)
    assert digest == hashlib.sha256(b"b" * 4096).hexdigest()
    assert len(counted) == 2


def test_a_file_changed_while_hashed_is_refused_and_not_remembered(cache, monkeypatch, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    original = atomic._sha256_of

    def appending(handle):
        digest = original(handle)
        with open(path, "ab") as writer:
            writer.write(b"more")
        return digest

    monkeypatch.setattr(atomic, "_sha256_of", appending)
    with pytest.raises(CheckpointError, match="its size went from 4096 to 4100 bytes"):
        atomic.hash_identified(path)
    assert not (cache / digest_cache.CACHE_FILE).exists()


@pytest.mark.parametrize("damage", [b"{not json", b'{"version": 1, "digests": {"k": 3}}', b"[]",
                                    b'{"version": 99, "digests": {}}'])
def test_a_damaged_cache_is_ignored_and_replaced(cache, counted, tmp_path, damage):
    cache.mkdir()
    (cache / digest_cache.CACHE_FILE).write_bytes(damage)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 100)
    assert atomic.hash_identified(path)[0] == hashlib.sha256(b"x" * 100).hexdigest()
    assert atomic.hash_identified(path)[0] == hashlib.sha256(b"x" * 100).hexdigest()
    assert len(counted) == 1  # the second read found the replaced cache


def test_a_wrong_digest_in_the_cache_is_not_a_digest(cache, counted, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x" * 100)
    key = digest_cache.key_of("sha256", [os.stat(path)])
    cache.mkdir()
    (cache / digest_cache.CACHE_FILE).write_text(json.dumps({"version": 1, "digests": {key: "not-a-sha256"}}))
    assert atomic.hash_identified(path)[0] == hashlib.sha256(b"x" * 100).hexdigest()
    assert counted == [str(path)]


def test_an_unwritable_cache_directory_only_costs_the_hashing(monkeypatch, counted, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(digest_cache.CACHE_ENV, str(blocker / "cache"))  # cannot be a directory
    monkeypatch.setattr(digest_cache, "MIN_BYTES", 0)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"y" * 10)
    assert atomic.hash_identified(path)[0] == atomic.hash_identified(path)[0]
    assert len(counted) == 2


def test_off_and_small_files_keep_nothing(monkeypatch, counted, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"z" * 10)
    monkeypatch.setenv(digest_cache.CACHE_ENV, "off")
    atomic.hash_identified(path)
    monkeypatch.setenv(digest_cache.CACHE_ENV, str(tmp_path / "cache"))  # MIN_BYTES as shipped: 10 bytes is below
    atomic.hash_identified(path)
    assert len(counted) == 2 and not (tmp_path / "cache").exists()


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(digest_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert digest_cache.cache_dir() == tmp_path / "umtam"


def test_the_oldest_entries_go_first(cache, monkeypatch):
    monkeypatch.setattr(digest_cache, "MAX_ENTRIES", 2)
    for index in range(3):
        digest_cache.store(f"key{index}", f"{index:064x}")
    assert digest_cache.lookup("key0") is None
    assert [digest_cache.lookup(f"key{i}") for i in (1, 2)] == [f"{1:064x}", f"{2:064x}"]


def test_a_base_fingerprint_is_remembered_by_its_files(cache, monkeypatch, tmp_path):
    from tiny_checkpoints import tiny_model

    directory = tmp_path / "base"
    tiny_model(seed=1).save_pretrained(directory)
    source = resolve_model(str(directory))
    keys = [key for key in tiny_model(seed=1).state_dict() if not key.startswith("classifier")]
    before = base_model.weight_file_stats(source)
    tensors = base_model.read_base_file(source, keys)
    first = base_model.file_fingerprint(source, keys, tensors, None, before)
    assert first == base_model.fingerprint(tensors)

    def refuse(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(base_model, "fingerprint", refuse)
    assert base_model.file_fingerprint(source, keys, tensors, None, base_model.weight_file_stats(source)) == first
    # another set of tensors from the same files is another digest
    with pytest.raises(AssertionError, match="hashed again"):
        base_model.file_fingerprint(source, keys[:-1], tensors, None, before)
