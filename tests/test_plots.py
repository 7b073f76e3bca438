"""The shared figure helpers: the moving average by hand, and a real PNG from the loss curves."""

from __future__ import annotations

import pytest

from umtam.plots import loss_curves_png, moving_average


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([4.0, 2.0], window=5) == [4.0, 3.0]
    assert moving_average([]) == []


def test_loss_curves_png_is_a_png():
    pytest.importorskip("matplotlib")
    png = loss_curves_png({"r=4": [1.0, 0.8, 0.7], "r=8": [1.0, 0.7, 0.5]}, title="rank sweep",
                          styles={"r=8": {"linestyle": "--"}})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
