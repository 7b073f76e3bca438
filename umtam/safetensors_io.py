"""The one way umtam opens, reads and writes safetensors files.

``open_safetensors`` memory-maps a file with the safetensors binding and maps
every error of the binding to a CheckpointError naming the file. The binding
(0.4.3 to 0.8.0, tested against malformed headers: tests/test_safetensors_io.py)
already refuses a header length past the end of the file or above its 100 MB
cap, a header that is not a JSON object, missing or mistyped fields, negative
or int64-overflowing shapes, a byte length that does not match the shape, gaps,
overlaps or data past the last tensor, non-string metadata and invalid UTF-8.
umtam adds the two checks it lacks (``_check_header``): the dtype must be one
torch reads element for element (``TORCH_DTYPES``): safetensors 0.8 accepts
the sub-byte F4 and hands torch a tensor of the wrong shape, and its message
for an unknown dtype does not name it; and every dimension must fit int64:
the binding checks the product of the dimensions only, so a zero-size tensor
may claim a dimension of 2**63, which torch cannot build (a TypeError when the
tensor is read).

``save_tensors`` writes with ``{"format": "pt"}`` metadata, as transformers
does, after giving tensors that share memory (tied weights) their own copy:
safetensors refuses shared storage.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from umtam.errors import CheckpointError, first_line

# Item size in bytes of each safetensors dtype torch reads element for element.
TORCH_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_METADATA_KEY = "__metadata__"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the binding's own cap


def unreadable(path: Path | str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({reason})")


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """A memory-mapped ``safe_open`` handle (framework "pt"); a bad file is a CheckpointError."""
    from safetensors import safe_open

    _check_header(Path(path))
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError, OSError...: the binding's ways of saying "unreadable"
        raise unreadable(path, first_line(exc, 200)) from exc
    with handle:
        yield handle


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the header alone (no tensor data is read)."""
    with open_safetensors(path) as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def load_tensors(path: str | Path) -> dict:
    """Every tensor of the file, read into memory."""
    with open_safetensors(path) as handle:
        try:
            return {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as exc:  # the data cannot be read as the header promised
            raise unreadable(path, first_line(exc, 200)) from exc


_MAX_DIMENSION = 2**63 - 1  # torch sizes are int64


def _check_header(path: Path) -> None:
    """The dtype and dimension checks the binding lacks, naming the tensor; the rest is the binding's."""
    header = _raw_header(path)
    if header is None:
        return  # the binding reports what is wrong with the header itself
    for name, info in header.items():
        if name == _METADATA_KEY or not isinstance(info, dict):
            continue
        dtype, shape = info.get("dtype"), info.get("shape")
        if isinstance(dtype, str) and dtype not in TORCH_DTYPES:
            raise unreadable(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if isinstance(shape, list) and any(isinstance(size, int) and size > _MAX_DIMENSION for size in shape):
            raise unreadable(path, f"tensor {name!r} has shape {shape} beyond int64 sizes")


def _raw_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
                return None
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({first_line(exc, 200)})") from exc
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def save_tensors(tensors: Mapping[str, Any], path: str | Path) -> None:
    """Write tensors (moved to CPU, contiguous, shared storage copied apart) as a safetensors file."""
    from safetensors.torch import save_file

    save_file(cpu_contiguous(tensors), str(path), metadata={"format": "pt"})


def cpu_contiguous(tensors: Mapping[str, Any]) -> dict:
    """Detached, contiguous CPU tensors; a tensor sharing memory with an earlier one gets its own copy."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        value = tensor.detach().contiguous().cpu()
        storage = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes()) if value.numel() else None
        if storage is not None and storage in seen:
            value = value.clone()
        elif storage is not None:
            seen.add(storage)
        out[name] = value
    return out
