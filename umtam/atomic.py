"""Directories written all at once or not at all, the output-path policy, and which input files may be read.

Both checkpoints (umtam.checkpoint) and training states (umtam.resume) are
directories built under a temporary name beside their target,
``.<name>.tmp-<pid>-<random>``, fsynced, and renamed into place, so a crash
leaves the old directory or the new one, never half of one. ``write_directory``
is that protocol; ``check_output_dir`` refuses an output before any work is
done. Two writes to the same output cannot both win: without ``replace`` the
final rename refuses an existing target atomically (Linux renameat2
RENAME_NOREPLACE), so the later of two concurrent runs fails and leaves the
earlier one's output as it is; ``check_output_dir`` already refuses an output
that a live process is staging.

Input files (``check_regular_file``, ``hash_identified``, ``copy_regular_file``):
only regular files are hashed or copied, and a symbolic link is followed only to
a file in its own directory, so no link smuggles an outside file (a key, a
password file) into an output or its sidecar, and no FIFO or device hangs a
read. ``FileIdentity`` (size, mtime, inode) is what a reader records when it
hashes a file, to notice later that it was rewritten or truncated while read.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from umtam import digest_cache
from umtam.errors import CheckpointError, ConfigError, UmtamError, first_line

T = TypeVar("T")
_HASH_CHUNK = 1 << 20
# A write stages ".<name>.tmp-<pid>-<random>" beside its target and, where it cannot
# swap atomically, moves the old directory to ".<name>.old-<pid>" for an instant.
_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-")
_STAGING_PID = re.compile(r"^\..+\.tmp-(\d+)-")
_RANDOM_SUFFIX = 8  # characters tempfile.mkdtemp appends to the prefix


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(directory: Path, known: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``directory``, by name.

    ``known`` holds digests the writer of a file already took as it wrote it
    (umtam.shards.WeightsWriter hashes what it wrote, behind the writing): those
    files are not read again.
    """
    known = known or {}
    return {path.name: {"sha256": known.get(path.name) or sha256_file(path), "bytes": path.stat().st_size}
            for path in sorted(directory.iterdir()) if path.is_file()}


def in_background(function: Callable[..., T], *args: Any) -> Future:
    """``function(*args)`` on a daemon thread; its result (or exception) in the returned Future.

    For hashing beside the work that reads the same files: hashlib releases the
    GIL on large updates, so a second core hashes while the first computes.
    A daemon thread never holds up the exit of a run that failed or was interrupted.
    """
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True, name="umtam-background").start()
    return future


def write_json_durably(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def is_write_leftover(path: str | Path) -> bool:
    """A staging or retired directory of a write, complete or not: never a checkpoint or a state."""
    return _LEFTOVER.match(Path(path).name) is not None


# ----------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class FileIdentity:
    """What changes when a file is rewritten in place (size, mtime), truncated (size) or replaced (inode)."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, info: os.stat_result) -> "FileIdentity":
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)

    def difference(self, now: "FileIdentity") -> str | None:
        """How ``now`` differs, in words, or None."""
        if (self.inode, self.device) != (now.inode, now.device):
            return "it was replaced by another file"
        if self.size != now.size:
            return f"its size went from {self.size} to {now.size} bytes"
        if self.mtime_ns != now.mtime_ns:
            return "it was modified"
        return None


def check_regular_file(path: Path) -> os.stat_result:
    """``path`` must be a regular file; a symbolic link may lead only to a file in the same directory.

    Checked before a file is hashed or copied: a link out of its directory would
    carry an unrelated file into an output and its sidecar, and a FIFO or a
    device would hang the read. Returns the stat of the file read.
    """
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            info = os.stat(_link_inside(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({first_line(exc, 200)})") from exc
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
        raise CheckpointError(f"{path}: not a regular file ({kind})", hint="umtam reads and copies regular files only")
    return info


def _link_inside(path: Path) -> Path:
    """Where the symbolic link ``path`` leads, refused unless it is a file beside it."""
    target = os.readlink(path)
    try:
        resolved = path.resolve(strict=True)
    except RuntimeError:  # Python 3.11 reports a loop so; later versions raise OSError(ELOOP)
        raise CheckpointError(f"{path}: a symbolic link loop (to {target})") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: a symbolic link loop (to {target})") from None
        raise CheckpointError(f"{path}: a symbolic link to {target}, which does not exist") from None
    if resolved.parent != path.parent.resolve() and not _hub_cache_blob(path.parent.resolve(), resolved):
        raise CheckpointError(f"{path}: a symbolic link to {resolved}, outside {path.parent}",
                              hint="umtam follows links only to files in the same directory; "
                                   "put a copy of the file there instead of the link")
    return resolved


def _hub_cache_blob(directory: Path, target: Path) -> bool:
    """A Hugging Face cache snapshot's file: <repo>/snapshots/<revision>/<file> -> <repo>/blobs/<sha>.

    The hub's cache stores every file once, under blobs/, and links each
    revision's files to it: following such a link stays inside the model the
    user named, so it is allowed, and only it.
    """
    return directory.parent.name == "snapshots" and target.parent == directory.parent.parent / "blobs"


def hash_identified(path: Path) -> tuple[str, FileIdentity]:
    """sha256 of a regular file and its identity, refused if the file changes while it is hashed."""
    info = check_regular_file(path)
    try:
        with open(path, "rb") as handle:
            opened = os.fstat(handle.fileno())
            before = FileIdentity.of(opened)
            # a large file hashed before and not written since is not read again (umtam.digest_cache)
            cache_key = digest_cache.key_of("sha256", [opened])
            cached = digest_cache.lookup(cache_key)
            digest = cached or _sha256_of(handle)
            after = FileIdentity.of(os.stat(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({first_line(exc, 200)})") from exc
    change = FileIdentity.of(info).difference(before) or before.difference(after)
    if change:
        raise changed_error(path, change)
    if cached is None:
        digest_cache.store(cache_key, digest)  # only a digest of a file that held still
    return digest, before


def _sha256_of(handle) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def current_identity(path: Path) -> FileIdentity | None:
    """The identity of the file ``path`` leads to now, or None when it is gone."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError:
        return None


def changed_error(path: Path, change: str) -> CheckpointError:
    return CheckpointError(f"{path}: changed while umtam was reading it ({change})",
                           hint="something rewrote or truncated it; run again once nothing writes to it")


def copy_regular_file(source: Path, destination: Path) -> None:
    """Copy ``source`` (checked as ``check_regular_file`` checks it) to a new regular file."""
    check_regular_file(source)
    resolved = source.resolve() if source.is_symlink() else source
    # O_NOFOLLOW: a link swapped in after the check is refused, never followed
    fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            raise CheckpointError(f"{source}: not a regular file")
        with open(destination, "xb") as writer:
            shutil.copyfileobj(reader, writer, _HASH_CHUNK)


# ----------------------------------------------------------------------------- output policy


def check_output_dir(output: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output location before any work is done, so nothing is half-written.

    Refused: an output inside an input (or the input itself), an output that
    contains an input (--force would delete it), an existing output without
    ``force``, a symbolic link (the write would replace the link, not what it
    points to), an output another live umtam process is writing right now, a
    name too long once the staging suffix is added, and a location that cannot
    be created (a parent that is a file, or not writable).
    """
    out = Path(output)
    try:
        if out.is_symlink():
            raise ConfigError(f"output {out} is a symbolic link (to {os.readlink(out)})",
                              hint="name the directory itself; umtam replaces an output as a whole")
        resolved = resolve_path(out, f"output {out}", ConfigError)
        for source in inputs:
            _check_apart(out, resolved, Path(source))
        exists = out.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"output {out}: unusable path ({first_line(exc, 200)})") from exc
    if exists and not force:
        raise ConfigError(f"output {out} already exists", hint="pass --force to replace it")
    if exists and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    ancestor = _check_creatable(out, resolved)
    check_name_fits(out, ancestor, _staging_prefix(resolved.name) + "X" * _RANDOM_SUFFIX)
    check_not_being_written(out)
    return out


def resolve_path(path: Path, what: str, error: type[UmtamError] = UmtamError) -> Path:
    """``path.resolve()``, with a symbolic link loop reported as one line naming ``what``."""
    try:
        return path.resolve()
    except RuntimeError:  # Python 3.11 raises this on a loop, not OSError
        raise error(f"{what}: a symbolic link loop", hint="fix or remove the link") from None


def _check_apart(out: Path, resolved: Path, source: Path) -> None:
    source_resolved = resolve_path(source, f"input {source}")
    if resolved == source_resolved or source_resolved in resolved.parents:
        raise ConfigError(f"output {out} is inside input {source}", hint="choose a separate directory")
    if resolved in source_resolved.parents:
        raise ConfigError(f"output {out} contains input {source}",
                          hint="choose a separate directory; replacing it would delete the input")


def _check_creatable(out: Path, resolved: Path) -> Path:
    """The nearest existing ancestor must be a directory we may write (mkdir creates the rest); returns it."""
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UmtamError(f"output {out}: cannot write to {ancestor} (permission denied)")
    return ancestor


def check_name_fits(path: Path, ancestor: Path, longest: str, what: str = "output") -> None:
    """``longest`` (the longest name a write of ``path`` creates) must fit the file system's NAME_MAX."""
    try:
        limit = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):  # no such limit reported: the write itself will tell
        return
    length = len(os.fsencode(longest))
    if limit > 0 and length > limit:
        raise ConfigError(f"{what} {path}: the name is too long for this file system ({length} bytes with the "
                          f"temporary name's prefix and suffix, at most {limit})", hint="choose a shorter name")


def check_not_being_written(out: Path) -> None:
    """Refuse ``out`` while another live process stages a write to it (``.<name>.tmp-<pid>-*`` beside it)."""
    for path in _staging_dirs(out):
        pid = int(_STAGING_PID.match(path.name).group(1))
        if pid != os.getpid() and _process_alive(pid):
            raise UmtamError(f"output {out} is being written by another process (pid {pid}, {path.name})",
                             hint=f"wait for it to finish or choose another output; if no umtam runs, "
                                  f"delete {path}")


def _staging_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-"


def _staging_dirs(out: Path) -> list[Path]:
    try:
        found = list(out.parent.glob(f".{glob.escape(out.name)}.tmp-*"))
    except OSError:
        return []
    return [path for path in found if _STAGING_PID.match(path.name)]


# ----------------------------------------------------------------------------- the write


def write_directory(out: Path, fill: Callable[[Path], T], *, what: str = "output", replace: bool = False) -> T:
    """Build ``out`` with ``fill(staging)`` in a temporary directory beside it, then rename it into place.

    With ``replace`` (the caller has allowed it: --force, or a state rewritten)
    an existing ``out`` is replaced; without it, an ``out`` that appeared while
    this one was built (a concurrent run) is left as it is and this write fails.
    Whatever ``fill`` or the rename raises removes the staging directory; a
    full disk or a vanished directory (OSError, or the safetensors binding's
    error for a failed write) becomes one UmtamError naming ``what`` and
    ``out``. Staging directories of killed writes to the same target are
    removed first.
    """
    from safetensors import SafetensorError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(out)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out.name), dir=out.parent))
    except OSError as exc:
        raise UmtamError(f"cannot create {what} {out} ({first_line(exc, 200)})") from exc
    try:
        result = fill(staging)
        swap_into_place(staging, out, replace=replace)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OutputTaken):
            raise UmtamError(f"{what} {out} was created by another process while this one was written; "
                             "it was left as it is", hint="choose another output, or pass --force to replace it"
                             ) from exc
        if isinstance(exc, (OSError, SafetensorError)):  # the user's to fix, not a bug
            raise UmtamError(f"cannot write {what} {out} ({first_line(exc, 200)})") from exc
        raise
    return result


def write_jsonl_directory(out: Path, files: Mapping[str, Iterable[Mapping[str, Any]]], *, what: str) -> None:
    """``out``/<name> with one JSON object a line for each of ``files``, written whole or not at all,
    replacing an earlier ``out`` (data a driver regenerates, never a user's output)."""
    def fill(staging: Path) -> None:
        for name, rows in files.items():
            (staging / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    write_directory(out, fill, what=what, replace=True)


def remove_dead_leftovers(out: Path) -> None:
    """Delete staging directories that killed writes to ``out`` left behind.

    Only those of processes no longer alive: a concurrent write keeps its own.
    A retired ``.old-`` directory is left alone: after a crash between the two
    renames of a non-atomic replace it holds the only copy of the old output.
    """
    for path in _staging_dirs(out):
        if not _process_alive(int(_STAGING_PID.match(path.name).group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def swap_into_place(staging: Path, out: Path, *, replace: bool = True) -> None:
    """Rename staging to out; with ``replace`` an existing out is replaced, without it OutputTaken.

    Without ``replace`` the rename itself refuses an existing target (Linux
    renameat2 RENAME_NOREPLACE), so of two concurrent writes exactly one wins;
    where that is unsupported, a check just before a plain rename leaves an
    instant in which an empty directory created at ``out`` would be replaced.
    With ``replace``, on Linux the two directories trade places in one atomic
    step, so out always holds the old or the new directory, then the old one
    (now at the staging name) is removed. Elsewhere the old one is moved aside
    first, and for the instant between the two renames neither exists.
    """
    for path in staging.iterdir():
        _fsync_file(path)
    if not replace:
        _rename_no_replace(staging, out)
    elif not os.path.lexists(out):
        os.rename(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # the staging name now holds the old output
    else:
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_dir(out.parent)


class OutputTaken(FileExistsError):
    """The target of a no-replace rename exists: another write got there first."""


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# renameat2 answers these where the kernel or the file system lacks the flag: fall back
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _rename_no_replace(source: Path, target: Path) -> None:
    failed = _renameat2(source, target, _RENAME_NOREPLACE)
    if failed == 0:
        return
    if failed in (errno.EEXIST, errno.ENOTEMPTY):
        raise OutputTaken(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    if failed is not None and failed not in _UNSUPPORTED:
        raise OSError(failed, os.strerror(failed), str(target))
    if os.path.lexists(target):
        raise OutputTaken(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    return _renameat2(first, second, _RENAME_EXCHANGE) == 0


def _renameat2(source: Path, target: Path, flags: int) -> int | None:
    """0 on success, else the errno; None where renameat2 does not exist (not Linux, glibc < 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
