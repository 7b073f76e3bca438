"""Hand back the pages of memory-mapped inputs once a row block has been read (Linux).

safetensors maps every input file into memory, and each page the merge reads
stays in the process's resident set until the map is closed: read tensor by
tensor, K inputs would still end up K models resident. ``release(tensor)``
tells the kernel the pages under a tensor are no longer needed (madvise
MADV_DONTNEED). For a file mapping that was never written, as these are, that
only unmaps them: the page cache keeps the data, a later read of the same
tensor faults it back in from there, and no value can change. Ranges that are
not inside a file mapping listed in /proc/self/maps (anonymous memory, such as
a base encoder rebuilt by transformers) are left alone, and so is everything
on other systems.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import sys
import threading
from pathlib import Path

from torch import Tensor

_MADV_DONTNEED = 4  # Linux's value; release() is a no-op elsewhere
_MAPS = Path("/proc/self/maps")


class MappedPages:
    """Releases the file-mapped pages under tensors; knows the mappings from /proc/self/maps.

    The list of mappings is read again only when an address is in none of them,
    so use one instance for one merge, while the files it reads stay open. The
    engine's merge threads share one instance: the list is looked up and
    replaced under a lock.
    """

    def __init__(self) -> None:
        self._madvise = _linux_madvise()
        self._starts: list[int] = []
        self._spans: list[tuple[int, int, bool]] = []  # (start, end, file-backed), sorted
        self._lock = threading.Lock()
        self.released_bytes = 0

    @property
    def can_release(self) -> bool:
        return self._madvise is not None

    def release(self, *tensors: Tensor | None) -> None:
        if self._madvise is None:
            return
        for tensor in tensors:
            if tensor is not None and tensor.numel() and tensor.is_contiguous() and tensor.device.type == "cpu":
                self._release_range(tensor.data_ptr(), tensor.numel() * tensor.element_size())

    def release_files(self, *tensors: Tensor | None) -> None:
        """Release every page of the files the tensors are mapped from, not only theirs.

        A read maps more than it asks for (the kernel maps whole page-cache folios
        and the pages around a fault), so the neighbours of small tensors read
        one by one would otherwise pile up.
        """
        if self._madvise is None:
            return
        spans = {self._file_span(tensor.data_ptr()) for tensor in tensors if tensor is not None and tensor.numel()}
        for span in spans - {None}:
            self._advise(span[0], span[1])

    def _release_range(self, address: int, length: int) -> None:
        span = self._file_span(address)
        if span is None or address + length > span[1]:
            return
        page = mmap.PAGESIZE
        self._advise(max(span[0], address - address % page), min(span[1], -(-(address + length) // page) * page))

    def _advise(self, start: int, end: int) -> None:
        if self._madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0:
            self.released_bytes += end - start

    def _file_span(self, address: int) -> tuple[int, int, bool] | None:
        with self._lock:
            span = self._span(address) or (self._refresh() or self._span(address))
        return span if span is not None and span[2] else None

    def _span(self, address: int) -> tuple[int, int, bool] | None:
        index = bisect.bisect_right(self._starts, address) - 1
        if index >= 0 and address < self._spans[index][1]:
            return self._spans[index]
        return None

    def _refresh(self) -> None:
        spans, regular = [], {}
        for line in _MAPS.read_text().splitlines():
            fields = line.split(maxsplit=5)
            start, _, end = fields[0].partition("-")
            inode = fields[4] if len(fields) > 4 else "0"
            path = fields[5] if len(fields) > 5 else ""
            if inode != "0" and path.startswith("/") and path not in regular:
                regular[path] = os.path.isfile(path)  # not /dev/zero, memfd or a deleted file
            spans.append((int(start, 16), int(end, 16), inode != "0" and regular.get(path, False)))
        spans.sort()
        self._spans, self._starts = spans, [span[0] for span in spans]


def _linux_madvise():
    if not sys.platform.startswith("linux") or not _MAPS.exists():
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise
