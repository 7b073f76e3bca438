"""Directories written all at once or not at all, and the output-path policy that goes with them.

Both checkpoints (umtam.checkpoint) and training states (umtam.resume) are
directories built under a temporary name beside their target,
``.<name>.tmp-<pid>-<random>``, fsynced, and renamed into place, so a crash
leaves the old directory or the new one, never half of one. ``write_directory``
is that protocol; ``check_output_dir`` refuses an output before any work is
done.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from umtam.errors import ConfigError, UmtamError, first_line

T = TypeVar("T")
_HASH_CHUNK = 1 << 20
# A write stages ".<name>.tmp-<pid>-<random>" beside its target and, where it cannot
# swap atomically, moves the old directory to ".<name>.old-<pid>" for an instant.
_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-")
_STAGING_PID = re.compile(r"^\..+\.tmp-(\d+)-")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``directory``, by name."""
    return {path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(directory.iterdir()) if path.is_file()}


def write_json_durably(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def is_write_leftover(path: str | Path) -> bool:
    """A staging or retired directory of a write, complete or not: never a checkpoint or a state."""
    return _LEFTOVER.match(Path(path).name) is not None


# ----------------------------------------------------------------------------- output policy


def check_output_dir(output: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output location before any work is done, so nothing is half-written.

    Refused: an output inside an input (or the input itself), an output that
    contains an input (--force would delete it), an existing output without
    ``force``, and a location that cannot be created (a parent that is a file,
    or not writable).
    """
    out = Path(output)
    try:
        resolved = out.resolve()
        for source in inputs:
            _check_apart(out, resolved, Path(source))
        exists = out.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"output {out}: unusable path ({first_line(exc, 200)})") from exc
    if exists and not force:
        raise ConfigError(f"output {out} already exists", hint="pass --force to replace it")
    if exists and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    _check_creatable(out, resolved)
    return out


def _check_apart(out: Path, resolved: Path, source: Path) -> None:
    source_resolved = source.resolve()
    if resolved == source_resolved or source_resolved in resolved.parents:
        raise ConfigError(f"output {out} is inside input {source}", hint="choose a separate directory")
    if resolved in source_resolved.parents:
        raise ConfigError(f"output {out} contains input {source}",
                          hint="choose a separate directory; replacing it would delete the input")


def _check_creatable(out: Path, resolved: Path) -> None:
    """The nearest existing ancestor must be a directory we may write (mkdir creates the rest)."""
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UmtamError(f"output {out}: cannot write to {ancestor} (permission denied)")


# ----------------------------------------------------------------------------- the write


def write_directory(out: Path, fill: Callable[[Path], T], *, what: str = "output") -> T:
    """Build ``out`` with ``fill(staging)`` in a temporary directory beside it, then swap it into place.

    An existing ``out`` (the caller has allowed it: --force, or a state
    rewritten) is replaced. Whatever ``fill`` or the swap raises removes the
    staging directory; a full disk or a vanished directory (OSError, or the
    safetensors binding's error for a failed write) becomes one UmtamError
    naming ``what`` and ``out``. Staging directories of killed writes to the
    same target are removed first.
    """
    from safetensors import SafetensorError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise UmtamError(f"cannot create {what} {out} ({first_line(exc, 200)})") from exc
    try:
        result = fill(staging)
        swap_into_place(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):  # the user's to fix, not a bug
            raise UmtamError(f"cannot write {what} {out} ({first_line(exc, 200)})") from exc
        raise
    return result


def remove_dead_leftovers(out: Path) -> None:
    """Delete staging directories that killed writes to ``out`` left behind.

    Only those of processes no longer alive: a concurrent write keeps its own.
    A retired ``.old-`` directory is left alone: after a crash between the two
    renames of a non-atomic replace it holds the only copy of the old output.
    """
    for path in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        match = _STAGING_PID.match(path.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out is replaced.

    On Linux the two directories trade places in one atomic step, so out always
    holds the old or the new directory, then the old one (now at the staging
    name) is removed. Elsewhere the old one is moved aside first, and for the
    instant between the two renames neither exists.
    """
    for path in staging.iterdir():
        _fsync_file(path)
    if not out.exists():
        os.rename(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # the staging name now holds the old output
    else:
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_dir(out.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    # non-zero: a kernel or filesystem without exchange (ENOSYS, EINVAL); the caller falls back
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
