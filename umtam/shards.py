"""Weights in one safetensors file or in shards: reading either as one, and writing a model tensor by tensor.

Reading. A directory's weights are ``model.safetensors``, or transformers'
sharded layout: ``model.safetensors.index.json`` (``{"metadata": {...},
"weight_map": {tensor: shard file}}``) and the shard files it names.
``weight_files`` lists them, checked: the index is a JSON object whose
weight_map maps every tensor to a plain file name in the directory, and every
shard it names exists; ``open_weights`` opens all of them as one handle
(``keys``, ``get_tensor``, ``get_slice``, ``file_of``), every shard
memory-mapped and checked by umtam.safetensors_io, and each shard must hold
exactly the tensors the index gives it.

Writing. ``WeightsWriter`` is told every tensor's name, dtype and shape
first. It lays them out as safetensors' own ``save_file`` does (by dtype,
largest first, then by name), over shards of at most ``shard_bytes`` each
(one file, ``model.safetensors``, without a limit), and writes each shard's
header at once. Tensors then come in any order and each one's bytes go
straight to their place (``os.pwrite``), so a merge hands every merged tensor
to the file as soon as it is made and never holds the merged model. A thread
hashes each file behind the writing, so its sha256 is known when it is closed. For one
file the bytes equal ``save_file``'s (tests/test_shards.py keeps that
reference beside this fast path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from umtam.errors import CheckpointError, ConfigError, first_line
from umtam.safetensors_io import TORCH_DTYPES, open_safetensors
from umtam.sidecar import INDEX_FILE, MODEL_FILE, is_plain_file_name

_METADATA = {"format": "pt"}
# safetensors 0.8's Dtype enum, last first: save_file puts larger enum values first
# (U64, I64, F64, F32, ... , BOOL), then orders by name.
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                "F64", "I64", "U64")


# ----------------------------------------------------------------------------- reading


def weight_files(directory: str | Path) -> list[str]:
    """The weight files of ``directory``: [model.safetensors], or the index and then its shards.

    CheckpointError when there are none, when the index is not what
    transformers writes, or when a shard it names is missing.
    """
    directory = Path(directory)
    if (directory / MODEL_FILE).is_file():
        return [MODEL_FILE]
    if not (directory / INDEX_FILE).is_file():
        raise CheckpointError(f"{directory}: no weights ({MODEL_FILE} or {INDEX_FILE})")
    return [INDEX_FILE, *sorted(set(read_index(directory).values()))]


def is_sharded(directory: str | Path) -> bool:
    directory = Path(directory)
    return not (directory / MODEL_FILE).is_file() and (directory / INDEX_FILE).is_file()


def read_index(directory: Path) -> dict[str, str]:
    """tensor -> shard file, from the index; every shard named must be a file beside it."""
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON index ({first_line(exc, 200)})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no 'weight_map' object of tensor names and shard files")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not is_plain_file_name(shard) or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{path}: tensor {tensor!r} is mapped to {shard!r}, not a .safetensors file "
                                  "beside the index")
    for shard in sorted(set(weight_map.values())):
        if not (directory / shard).is_file():
            raise CheckpointError(f"{path}: names shard {shard}, which is missing",
                                  hint="copy every shard the index lists into the directory")
    return weight_map


class ShardedHandle:
    """Several opened safetensors files as one: each tensor read from the shard that holds it."""

    def __init__(self, handles: Mapping[str, Any], owner: Mapping[str, str]):
        self._handles = handles  # shard file name -> safe_open handle
        self._owner = dict(owner)  # tensor -> shard file name

    def keys(self) -> list[str]:
        return list(self._owner)

    def file_of(self, name: str) -> str:
        return self._owner[name]

    def get_tensor(self, name: str):
        return self._handles[self._owner[name]].get_tensor(name)

    def get_slice(self, name: str):
        return self._handles[self._owner[name]].get_slice(name)


@contextlib.contextmanager
def open_weights(directory: str | Path) -> Iterator[ShardedHandle]:
    """Every weight file of ``directory``, memory-mapped, as one handle (see the module docstring)."""
    directory = Path(directory)
    files = weight_files(directory)
    with contextlib.ExitStack() as stack:
        if files == [MODEL_FILE]:
            handle = stack.enter_context(open_safetensors(directory / MODEL_FILE))
            yield ShardedHandle({MODEL_FILE: handle}, {name: MODEL_FILE for name in handle.keys()})
            return
        weight_map = read_index(directory)
        handles = {shard: stack.enter_context(open_safetensors(directory / shard)) for shard in files[1:]}
        for shard, handle in handles.items():
            held, listed = set(handle.keys()), {t for t, s in weight_map.items() if s == shard}
            if held != listed:
                odd = sorted(held ^ listed)[0]
                where = "holds" if odd in held else "lacks"
                raise CheckpointError(f"{directory / shard}: {where} tensor {odd!r}, which {INDEX_FILE} "
                                      f"{'does not map to it' if odd in held else 'maps to it'}")
        yield ShardedHandle(handles, weight_map)


def weight_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every weight file, from the headers alone."""
    with open_weights(directory) as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def load_weights(directory: str | Path) -> dict:
    """Every weight tensor of ``directory``, read into memory."""
    with open_weights(directory) as handle:
        try:
            return {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # the data cannot be read as the header promised
            raise CheckpointError(f"{directory}: weights not readable ({first_line(exc, 200)})") from exc


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, safetensors dtype ("BF16") and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * TORCH_DTYPES[self.dtype]


def entry_of(name: str, tensor) -> Entry:
    return Entry(name, safetensors_dtype(tensor.dtype), tuple(tensor.shape))


def safetensors_dtype(dtype) -> str:
    """torch.bfloat16 -> "BF16", and so on for every dtype umtam writes."""
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    if dtype not in names:
        raise ValueError(f"umtam does not write {dtype} tensors")
    return names[dtype]


def parse_size(text: str) -> int:
    """"5GB", "500MB", "2GiB", "1000000" -> bytes (the decimal and binary units transformers accepts)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    cleaned = text.strip().upper().replace(" ", "")
    number = cleaned.rstrip("KMGTIB")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"shard size {text!r} is not a size", hint="e.g. 5GB, 500MB or 2GiB") from None
    if unit not in units or not math.isfinite(value) or value * units[unit] < 1:
        raise ConfigError(f"shard size {text!r} is not a size", hint="e.g. 5GB, 500MB or 2GiB")
    return int(value * units[unit])


def _file_order(entries: Sequence[Entry]) -> list[Entry]:
    rank = {name: index for index, name in enumerate(_DTYPE_ORDER)}
    return sorted(entries, key=lambda e: (-rank.get(e.dtype, -1), e.name))


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [MODEL_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class _TrailingHash:
    """sha256 of a file written at known offsets, taken on a thread that follows the written prefix.

    Each write marks its byte range; the thread hashes (reading back with
    os.pread, from the page cache) as far as the file is written without gaps.
    When every byte is written the digest is that of the finished file, and
    nothing has to read the file again to record it.
    """

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self._digest = hashlib.sha256()
        self._hashed = self._ready = 0
        self._ranges: dict[int, int] = {}  # start -> end of written ranges beyond the prefix
        self._stop = False
        self._error: OSError | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="umtam-output-hash")
        self._thread.start()

    def mark(self, start: int, end: int) -> None:
        if end == start:  # a tensor with no entries writes no bytes (and shares its offset with the next)
            return
        with self._changed:
            self._ranges[start] = end
            while self._ready in self._ranges:
                self._ready = self._ranges.pop(self._ready)
            self._changed.notify()

    def _follow(self) -> None:
        while True:
            with self._changed:
                while self._hashed == self._ready and not self._stop:
                    self._changed.wait()
                if self._stop:
                    return
                start, end = self._hashed, min(self._ready, self._hashed + _HASH_CHUNK)
            try:
                self._digest.update(os.pread(self.fd, end - start, start))
            except OSError as exc:  # said by hexdigest, in the thread that writes
                self._error = exc
                return
            with self._changed:
                self._hashed = end
                if self._hashed == self.size:
                    return

    def hexdigest(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._hashed != self.size:
            raise ValueError("the file was not written in full")
        return self._digest.hexdigest()

    def stop(self) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()
        self._thread.join()


_HASH_CHUNK = 8 << 20
QUEUED = 2  # tensors handed over but not yet written: the memory the writing thread may hold
# The writing thread flushes a file to disk each time this much has been written to it since its
# last flush, so the flush at close (which the caller waits for) only has the tail left.
_SYNC_BYTES = 256 << 20


class WeightsWriter:
    """Writes declared tensors into their places in one file or in shards (see the module docstring).

    ``write`` hands a tensor to a writing thread and returns (at most
    ``QUEUED`` wait their turn), so the caller computes the next tensor while
    this one goes to disk; an error of the writing (a full disk) is raised by
    the next ``write`` or by ``close``. Every file's sha256 is taken behind the
    writing (``_TrailingHash``): ``close`` returns the files' names and
    ``digests`` holds their sha256.
    """

    def __init__(self, directory: str | Path, entries: Sequence[Entry], shard_bytes: int | None = None):
        names = [entry.name for entry in entries]
        if len(set(names)) != len(names):
            raise ValueError("a tensor is declared twice")
        self.directory = Path(directory)
        self.shards = self._layout(_file_order(entries), shard_bytes)
        self.files = _shard_names(len(self.shards))
        self._places: dict[str, tuple[int, int, Entry]] = {}  # name -> (fd, absolute offset, entry)
        self._fds: list[int] = []
        self._hashes: dict[int, _TrailingHash] = {}  # fd -> its file's hash
        self.digests: dict[str, str] = {}
        # Bytes go to disk on a thread of their own while the caller makes the next tensor.
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED)
        self._error: OSError | None = None
        self._writer = threading.Thread(target=self._write_queued, daemon=True, name="umtam-weights-writer")
        self._left = set(names)
        self._open_and_write_headers()
        self._writer.start()

    @staticmethod
    def _layout(ordered: list[Entry], shard_bytes: int | None) -> list[list[Entry]]:
        shards: list[list[Entry]] = [[]]
        size = 0
        for entry in ordered:
            if shard_bytes is not None and shards[-1] and size + entry.nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += entry.nbytes
        return shards

    def _open_and_write_headers(self) -> None:
        for name, shard in zip(self.files, self.shards):
            header, offset = {"__metadata__": _METADATA}, 0
            for entry in shard:
                header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                                      "data_offsets": [offset, offset + entry.nbytes]}
                offset += entry.nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as save_file pads it
            fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)  # read back to hash
            self._fds.append(fd)
            os.write(fd, len(text).to_bytes(8, "little") + text)
            os.ftruncate(fd, 8 + len(text) + offset)  # the full size now: a short write shows as a gap of zeros
            self._hashes[fd] = _TrailingHash(fd, 8 + len(text) + offset)
            self._hashes[fd].mark(0, 8 + len(text))
            for entry in shard:
                self._places[entry.name] = (fd, 8 + len(text) + header[entry.name]["data_offsets"][0], entry)

    def write(self, name: str, tensor) -> None:
        """The bytes of ``tensor`` into its declared place; dtype and shape must be as declared."""
        fd, offset, entry = self._places[name]
        if name not in self._left:
            raise ValueError(f"tensor {name!r} written twice")
        if entry_of(name, tensor) != entry:
            raise ValueError(f"tensor {name!r} is {entry_of(name, tensor)}, declared {entry}")
        self._raise_write_error()
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self._queue.put((fd, flat, offset))  # waits while QUEUED writes are pending: bounded memory
        self._left.discard(name)

    def _write_queued(self) -> None:
        """The writing thread: each queued tensor's bytes to its place, then marked for the hash behind."""
        unsynced: dict[int, int] = {}  # fd -> bytes written since its last flush
        while (item := self._queue.get()) is not None:
            fd, flat, offset = item
            if self._error is not None:
                continue  # drain: the first error is the one to report
            try:
                view, start = memoryview(flat.view(_byte_dtype()).numpy()), offset
                while view:
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
                self._hashes[fd].mark(start, offset)
                unsynced[fd] = unsynced.get(fd, 0) + offset - start
                if unsynced[fd] >= _SYNC_BYTES:  # flushed here, beside the caller's work
                    os.fdatasync(fd)
                    unsynced[fd] = 0
            except OSError as exc:  # a full disk: raised in the caller's thread by write() or close()
                self._error = exc

    def _raise_write_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _finish_writes(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def close(self) -> list[str]:
        """Flush every shard to disk and write the index (sharded); the names of the files written."""
        if self._left:
            raise ValueError(f"{len(self._left)} declared tensor(s) never written, e.g. {sorted(self._left)[0]!r}")
        self._finish_writes()
        self._raise_write_error()
        for name, fd in zip(self.files, self._fds):
            os.fsync(fd)
            self.digests[name] = self._hashes[fd].hexdigest()
        self.abort()  # every follower is done: this closes the files
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {entry.name: name for name, shard in zip(self.files, self.shards) for entry in shard}
        total = sum(entry.nbytes for shard in self.shards for entry in shard)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [INDEX_FILE, *self.files]

    def abort(self) -> None:
        self._finish_writes()
        for fd in self._fds:
            follower = self._hashes.pop(fd, None)
            if follower is not None:
                follower.stop()
            os.close(fd)
        self._fds = []


def _byte_dtype():
    import torch

    return torch.uint8


def write_weights(directory: str | Path, tensors: Mapping[str, Any], shard_bytes: int | None = None) -> list[str]:
    """Every tensor of ``tensors`` into ``directory`` (shared storage is fine: each is written from its own view)."""
    writer = WeightsWriter(directory, [entry_of(name, tensor) for name, tensor in tensors.items()], shard_bytes)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.close()
    finally:
        writer.abort()
