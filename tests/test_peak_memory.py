"""A run's peak memory is its own: a driver training many runs in one process reports each one's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from umtam.train import peak_rss_bytes, reset_peak_rss

MIB = 1 << 20


def clear_refs_permitted() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.skipif(not clear_refs_permitted(), reason="only Linux resets the peak RSS, where clear_refs is permitted")
def test_the_peak_starts_afresh_after_a_reset():
    big = torch.ones(64 * MIB)  # 64 Mi float32 = 256 MiB, every page touched
    after_big = peak_rss_bytes()
    del big
    reset_peak_rss()
    fresh = peak_rss_bytes()
    assert after_big - fresh > 200 * MIB  # the freed tensor no longer counts
    assert fresh > 0
