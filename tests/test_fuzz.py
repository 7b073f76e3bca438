"""Fuzzing the checkpoint loaders: mutated sidecars and safetensors files fail only as UmtamError.

The strategies live in fuzz_strategies.py (bench/fuzz.py runs the same ones for
10,000 cases). Here hypothesis drives them through ``st.randoms()``, so a
failure shrinks to a small sequence of choices. Below the property tests, the
header validator is pinned case by case, and one test shows the property would
catch a loader that trusted its input.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_strategies import (READERS, exercise, inspect_sidecar, run_case, sidecar_variants, single_point_mutations,
                             write_seed_checkpoint)
from umtam import checkpoint
from umtam.checkpoint import MAX_HEADER_BYTES, TensorEntry, load_checkpoint, read_safetensors_header
from umtam.errors import CheckpointError, UmtamError

# deadline=None: the shared 2-core machine makes per-example timing noise; fuzz_once bounds it loosely instead.
# bounded_memory is function-scoped on purpose: it measures all the examples of one test together.
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW_CASE_SECONDS = 10  # a case takes ~15 ms; one this slow is a hang in the making
RSS_GROWTH_LIMIT = 256 * 2**20  # the cases are a few KiB: a loader allocating what a header claims shows here


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    return write_seed_checkpoint(tmp_path_factory.mktemp("fuzz") / "seed")


@pytest.fixture
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < RSS_GROWTH_LIMIT


def fuzz_once(rng, seed_dir: Path, target: str) -> str:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        mutated, outcome = run_case(rng, seed_dir, Path(scratch) / "case", target)
    assert mutated == target
    assert outcome in ("ok", "CheckpointError")
    assert time.perf_counter() - started < SLOW_CASE_SECONDS
    return outcome


def test_the_seed_checkpoint_reads_cleanly_everywhere(seed_dir):
    assert exercise(seed_dir) == {name: "ok" for name in READERS}


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutated_sidecars_fail_only_as_umtam_errors(seed_dir, bounded_memory, rng):
    fuzz_once(rng, seed_dir, "sidecar")


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutated_weights_fail_only_as_umtam_errors(seed_dir, bounded_memory, rng):
    fuzz_once(rng, seed_dir, "model")


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutated_statistics_fail_only_as_umtam_errors(seed_dir, bounded_memory, rng):
    fuzz_once(rng, seed_dir, "stats")


@pytest.mark.parametrize("kind", ["train", "prune", "merge"])
def test_every_single_field_of_a_sidecar_mutated_fails_only_as_umtam_error(seed_dir, kind):
    # Exhaustive where the random edits are thin: each value deleted or given each other JSON type.
    document = sidecar_variants(seed_dir)[kind]
    inspect_sidecar(seed_dir, document)
    refused = []
    for where, mutated in single_point_mutations(document):
        try:
            inspect_sidecar(seed_dir, mutated)
        except UmtamError as error:
            refused.append(str(error))
        except Exception as exc:  # noqa: BLE001 - report which field, not just the traceback
            pytest.fail(f"{kind} sidecar, {where}: {type(exc).__name__}: {exc}")
    assert any("missing field(s) kind" in message for message in refused)
    assert any("tasks.mrpc.label_names must be a list of strings" in message for message in refused)


def test_the_property_catches_a_loader_that_trusts_headers(seed_dir, tmp_path, monkeypatch):
    # Without header validation, safe_open (the merge engine's reader) meets the
    # malformed files itself and raises its own errors: the fuzz cases must see that.
    monkeypatch.setattr(checkpoint, "read_safetensors_header", lambda path: {})
    escaped = []
    for index in range(40):
        try:
            run_case(random.Random(f"trusting:{index}"), seed_dir, tmp_path / f"case-{index}", "model")
        except Exception as exc:  # noqa: BLE001 - collecting exactly what the property forbids
            escaped.append(type(exc).__name__)
    assert "SafetensorError" in escaped


# ----------------------------------------------------------------------------- the header validator, case by case


def safetensors_bytes(header: dict, data: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(name="w", shape=(3,), offsets=(0, 12)) -> dict:
    return {name: {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}}


def test_a_valid_file_gives_the_shapes_safetensors_gives(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.zeros(0, 5)}, str(path))
    entries = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as handle:
        theirs = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    assert {key: list(entry.shape) for key, entry in entries.items()} == theirs
    assert entries["a"] == TensorEntry("F32", (2, 3), 0, 24)
    assert entries["b"] == TensorEntry("BF16", (4,), 24, 32)
    assert entries["c"].shape == (0, 5) and entries["c"].begin == entries["c"].end


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02\x03", "3 bytes, too short for the 8-byte header length"),
    (struct.pack("<Q", 500) + b"{}", "header length 500 exceeds the 2 bytes that follow it"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the 2 bytes"),
    (safetensors_bytes({}, b"", raw=b' {"w": 1}'), "the header is not a JSON object"),
    (safetensors_bytes({}, b"", raw=b"[1, 2]"), "the header is not a JSON object"),
    (safetensors_bytes({}, b"", raw=b"{\xff}"), "header is not valid JSON"),
    (safetensors_bytes({}, b"", raw=b"{" * 50_000), "header is not valid JSON"),
    (safetensors_bytes({}, b"\0" * 4, raw=b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                             b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
     "duplicate key 'w'"),
    (safetensors_bytes({}, b"\0" * 4, raw=b'{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
     "is not valid UTF-8"),
    (safetensors_bytes({"__metadata__": {"format": 1}, **f32()}, b"\0" * 12), "__metadata__ must map strings"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3]}}, b"\0" * 12), "must have exactly the fields"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12], "x": 1}}, b"\0" * 12),
     "must have exactly the fields"),
    (safetensors_bytes({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
     "unknown dtype 'C64'"),
    (safetensors_bytes({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype 'F4'"),
    (safetensors_bytes(f32(shape=[-3]), b"\0" * 12), "invalid shape [-3]"),
    (safetensors_bytes(f32(shape=[3.0]), b"\0" * 12), "invalid shape [3.0]"),
    (safetensors_bytes(f32(shape=[True, 3]), b"\0" * 12), "invalid shape [True, 3]"),
    (safetensors_bytes(f32(offsets=[12, 0]), b"\0" * 12), "invalid data_offsets [12, 0]"),
    (safetensors_bytes(f32(offsets=[0, 12, 12]), b"\0" * 12), "invalid data_offsets"),
    (safetensors_bytes(f32(shape=[4]), b"\0" * 12), "spans 12 bytes but F32 [4] needs 16"),
    (safetensors_bytes(f32(shape=[2**40], offsets=[0, 2**42]), b"\0" * 12),
     "tensors cover 4398046511104 bytes of a 12-byte data section"),
    # torch sizes are int64: the binding itself fails with a TypeError on this one
    (safetensors_bytes(f32(shape=[0, 2**63], offsets=[0, 0]), b""), "beyond int64 sizes"),
    (safetensors_bytes(f32(shape=[2**40, 2**40, 0], offsets=[0, 0]), b""), "beyond int64 sizes"),
    (safetensors_bytes({**f32("a"), **f32("b", offsets=[4, 16])}, b"\0" * 16), "overlaps the tensor before it"),
    (safetensors_bytes(f32(shape=[2], offsets=[4, 12]), b"\0" * 12), "leaves a gap at byte 0"),
    (safetensors_bytes(f32(), b"\0" * 13), "tensors cover 12 bytes of a 13-byte data section"),
])
def test_malformed_headers_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refused:
        read_safetensors_header(path)
    text = str(refused.value)
    assert text.startswith(f"{path}: not a readable safetensors file (") and message in text
    assert "\n" not in text


def test_a_header_length_past_the_cap_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as handle:  # sparse: the length fits the file but not the cap
        handle.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        handle.truncate(MAX_HEADER_BYTES + 64)
    with pytest.raises(CheckpointError, match=f"header length {MAX_HEADER_BYTES + 1} exceeds the {MAX_HEADER_BYTES}"):
        read_safetensors_header(path)


# ----------------------------------------------------------------------------- sidecars, case by case


def test_sidecar_nested_past_the_recursion_limit_is_invalid_json(seed_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    (case / "umtam.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"umtam.json: not valid JSON \(maximum recursion depth"):
        load_checkpoint(case)


def test_sidecar_that_is_not_utf8_names_the_file(seed_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    (case / "umtam.json").write_bytes(b'{"kind": "\xff"}')
    with pytest.raises(CheckpointError, match=r"umtam.json: not valid JSON \(not UTF-8"):
        load_checkpoint(case)


def test_an_oversized_sidecar_is_refused_before_it_is_read(seed_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    with open(case / "umtam.json", "r+b") as handle:
        handle.truncate(checkpoint.MAX_SIDECAR_BYTES + 1)  # sparse
    with pytest.raises(CheckpointError, match="too large for a sidecar"):
        load_checkpoint(case)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["files"].update({"a\nb": s["files"]["config.json"]}), "points outside the checkpoint directory"),
    (lambda s: s["tasks"]["mrpc"].update(is_regression="no"), "tasks.mrpc.is_regression must be true or false"),
    (lambda s: s["tasks"]["mrpc"].update(label_names=[1, 2]), "tasks.mrpc.label_names must be a list of strings"),
    (lambda s: s["tasks"]["mrpc"].update(label_names=[]), "non-empty for a classification task"),
    (lambda s: s["tasks"]["mrpc"].update(metrics=[0.5]), "tasks.mrpc.metrics must be an object of numbers"),
    (lambda s: s["tasks"].update({"a/b": s["tasks"]["mrpc"]}), "a task name must be a non-empty printable name without '/'"),
    (lambda s: s["files"]["config.json"].update(sha256="XYZ"), "files['config.json'].sha256 must be 64 lowercase hex"),
    (lambda s: s["files"]["config.json"].update(bytes=-1), "files['config.json'].bytes must be a non-negative integer"),
    (lambda s: s.update(optimizer=["umtam"]), "optimizer must be an object with a 'name' string"),
    (lambda s: s.update(steps="6"), "steps must be a non-negative integer, got '6'"),
    (lambda s: s.update(lineage={"inputs": [{"sha256": 5}]}), "lineage.inputs[0].sha256 must be a string"),
    (lambda s: s["base_model"].update(init_seed="x"), "base_model.init_seed must be an integer"),
])
def test_optional_fields_with_the_wrong_type_are_named(seed_dir, tmp_path, edit, message):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    sidecar = json.loads((case / "umtam.json").read_text())
    edit(sidecar)
    (case / "umtam.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(case)
    assert message in str(refused.value) and "\n" not in str(refused.value)
