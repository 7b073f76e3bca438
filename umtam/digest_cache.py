"""Digests of large files remembered by file identity, so that a file read again is not hashed again.

A merge records the sha256 of every input file and fingerprints the base it
reads; a merge user tries several methods and options on the same experts,
and on two cores hashing the 9 GB of a three-expert 0.9B merge took about 5 of
its 13 seconds (bench/llm_merge.py). A digest (of one file, or over several,
such as a base's fingerprint over its shards) is kept in one JSON file in the
cache directory, keyed by what any write to a file changes: device, inode,
size, mtime and ctime, in nanoseconds. A user process cannot set ctime (touch
and os.utime set it to now), so a file rewritten in place, even with its mtime
put back, misses the cache and is hashed again. What the cache cannot see is
damage below the file system (a bad disk block) after the first hash; git's
index makes the same trade.

Where: $UMTAM_CACHE_DIR, else $XDG_CACHE_HOME/umtam, else ~/.cache/umtam;
``UMTAM_CACHE_DIR=off`` turns the cache off. Only digests over at least
MIN_BYTES are kept: smaller files hash faster than the cache is read. The
cache is an optimisation and never an error: an unreadable, damaged or
unwritable cache is ignored, and two processes writing it at once may lose
each other's new entries, never the file (it is replaced whole).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Sequence

CACHE_ENV = "UMTAM_CACHE_DIR"
CACHE_FILE = "digests.json"
MIN_BYTES = 64 << 20
MAX_ENTRIES = 4096  # the oldest go first: a few hundred KiB of JSON at most
_VERSION = 1
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_lock = threading.Lock()  # one process's hashing threads update the file one at a time


def cache_dir() -> Path | None:
    """The cache directory, or None when UMTAM_CACHE_DIR=off."""
    configured = os.environ.get(CACHE_ENV)
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "umtam"


def key_of(kind: str, infos: Sequence[os.stat_result]) -> str | None:
    """The cache key of a digest of ``kind`` over files as ``infos`` found them; None if not worth keeping."""
    if sum(info.st_size for info in infos) < MIN_BYTES or cache_dir() is None:
        return None
    identity = [[info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns] for info in infos]
    return hashlib.sha256(json.dumps([kind, identity]).encode()).hexdigest()


def lookup(key: str | None) -> str | None:
    """The digest kept under ``key``, or None. Callers store a digest only once the file is seen to
    have held still while it was taken (atomic.hash_identified, base_model.file_fingerprint)."""
    if key is None:
        return None
    found = _read().get(key)
    return found if isinstance(found, str) and _HEX_DIGEST.fullmatch(found) else None


def store(key: str | None, digest: str) -> None:
    """Keep ``digest`` under ``key`` (nothing for a None key)."""
    if key is None:
        return
    directory = cache_dir()
    with _lock:
        digests = _read()
        digests.pop(key, None)
        digests[key] = digest  # newest last
        payload = {"version": _VERSION, "digests": dict(list(digests.items())[-MAX_ENTRIES:])}
        try:
            _replace_json(directory / CACHE_FILE, payload)
        except OSError:
            pass  # a read-only or full cache directory: the next run hashes again


def _read() -> dict[str, str]:
    directory = cache_dir()
    try:
        payload = json.loads((directory / CACHE_FILE).read_text())
    except (OSError, ValueError, TypeError):
        return {}
    if not isinstance(payload, dict) or payload.get("version") != _VERSION or not isinstance(payload.get("digests"), dict):
        return {}
    return payload["digests"]


def _replace_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(payload, handle)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
