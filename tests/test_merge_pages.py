"""Handing back the pages of memory-mapped inputs (umtam.merge.pages)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from umtam.merge.pages import MappedPages


def _resident_file_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on file mappings is Linux-only here")
def test_released_mapped_pages_leave_rss_and_read_back_unchanged(tmp_path):
    expected = torch.randn(1024, 1024)  # 4 MiB
    save_file({"w": expected}, str(tmp_path / "w.safetensors"))
    pages = MappedPages()
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        mapped = handle.get_tensor("w")
        assert torch.equal(mapped, expected)  # every page read: resident
        before = _resident_file_kib()
        pages.release(mapped[:512], mapped[512:])
        assert pages.released_bytes >= 4 * 2**20
        assert _resident_file_kib() <= before - 3 * 1024
        assert torch.equal(mapped, expected)  # faulted back in from the page cache


def test_anonymous_memory_is_never_released():
    tensor = torch.arange(1 << 20, dtype=torch.float32)
    pages = MappedPages()
    pages.release(tensor, None, tensor[::2])
    assert pages.released_bytes == 0
    assert torch.equal(tensor, torch.arange(1 << 20, dtype=torch.float32))
