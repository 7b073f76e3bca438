"""The shared figure helpers: the moving average by hand, and real pixels of the loss curves."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from umtam.plots import loss_curves_png, moving_average

BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two cycle colours: C0, C1
FAINT_BLUE = (199, 221, 236)  # C0 at alpha 0.25 over white: the raw per-step curve behind a single run
SIZE = (440, 770)  # (height, width): figsize 7 x 4 inches at 110 dpi


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([4.0, 2.0], window=5) == [4.0, 3.0]
    assert moving_average([]) == []


def pixels(png: bytes) -> np.ndarray:
    """The decoded PNG as 8-bit RGB, shape (height, width, 3)."""
    from matplotlib.image import imread

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return (imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(np.int64)


def count(rgb: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels of exactly ``colour`` (a line's core; its antialiased edges are blends)."""
    return int((rgb == np.array(colour)).all(axis=-1).sum())


def test_each_curve_is_drawn_in_its_own_colour_and_style():
    pytest.importorskip("matplotlib")
    curves = {"r=4": [1.0, 0.8, 0.7], "r=8": [1.0, 0.7, 0.5]}
    dashed = pixels(loss_curves_png(curves, title="rank sweep", styles={"r=8": {"linestyle": "--"}}))
    solid = pixels(loss_curves_png(curves, title="rank sweep"))
    assert dashed.shape == solid.shape == (*SIZE, 3)
    # each line crosses the 600-pixel-wide axes: hundreds of pixels of its colour
    assert count(solid, BLUE) > 400 and count(solid, ORANGE) > 400
    # the style reaches r=8 alone: its dashes leave gaps, r=4 stays a solid line
    assert count(dashed, ORANGE) < 0.75 * count(solid, ORANGE)
    assert count(dashed, BLUE) == pytest.approx(count(solid, BLUE), abs=20)
    # with two runs the raw steps are not drawn (only antialiased edges come near the faint colour)
    assert count(solid, FAINT_BLUE) < 30


def test_a_single_run_also_shows_its_raw_steps_faintly():
    pytest.importorskip("matplotlib")
    rgb = pixels(loss_curves_png({"run": [1.0, 0.8, 0.7, 0.9, 0.4]}, title="one"))
    assert rgb.shape == (*SIZE, 3)
    assert count(rgb, BLUE) > 400 and count(rgb, FAINT_BLUE) > 60


def test_different_losses_draw_a_different_picture():
    pytest.importorskip("matplotlib")
    first = pixels(loss_curves_png({"run": [1.0, 0.8, 0.7]}, title="t"))
    again = pixels(loss_curves_png({"run": [1.0, 0.8, 0.7]}, title="t"))
    other = pixels(loss_curves_png({"run": [1.0, 0.6, 0.9]}, title="t"))
    assert np.array_equal(first, again)
    assert (first != other).any(axis=-1).sum() > 200


def test_train_writes_the_loss_plot_into_the_checkpoint_when_asked(tmp_path, tiny_model_dir, glue_dir):
    pytest.importorskip("matplotlib")
    from umtam.checkpoint import load_checkpoint
    from umtam.train import LOSS_PLOT_FILE, TrainConfig, train

    config = TrainConfig(task="rte", output=str(tmp_path / "rte"), model=str(tiny_model_dir), max_steps=4,
                         batch_size=8, max_length=32, data_dir=str(glue_dir), plot_loss=True)
    out = train(config).path
    rgb = pixels((out / LOSS_PLOT_FILE).read_bytes())
    # one run: its moving average in C0 and the 4 raw step losses faintly behind it
    assert rgb.shape == (*SIZE, 3)
    assert count(rgb, BLUE) > 400 and count(rgb, FAINT_BLUE) > 30
    sidecar = json.loads((out / "umtam.json").read_text())
    assert len(sidecar["training"]["loss_curve"]) == 4
    # written with the checkpoint, so it is hashed like every other file and the directory still loads
    assert LOSS_PLOT_FILE in sidecar["files"]
    load_checkpoint(out)
    assert "plot_loss" not in sidecar["training"]["config"]
