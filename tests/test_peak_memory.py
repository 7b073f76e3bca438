"""A run's peak memory is its own: a driver training many runs in one process reports each one's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from umtam.train import peak_rss_bytes, reset_peak_rss

MIB = 1 << 20


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux resets the peak RSS; others cannot")
def test_the_peak_starts_afresh_after_a_reset():
    big = torch.ones(64 * MIB)  # 64 Mi float32 = 256 MiB, every page touched
    after_big = peak_rss_bytes()
    del big
    reset_peak_rss()
    fresh = peak_rss_bytes()
    if fresh == after_big:
        pytest.skip("this kernel refused to reset the peak (clear_refs not permitted)")
    assert after_big - fresh > 200 * MIB  # the freed tensor no longer counts
    assert fresh > 0
