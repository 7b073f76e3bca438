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


def test_train_writes_the_loss_plot_into_the_checkpoint_when_asked(tmp_path, tiny_model_dir, glue_dir):
    pytest.importorskip("matplotlib")
    from umtam.checkpoint import load_checkpoint
    from umtam.train import LOSS_PLOT_FILE, TrainConfig, train

    config = TrainConfig(task="rte", output=str(tmp_path / "rte"), model=str(tiny_model_dir), max_steps=4,
                         batch_size=8, max_length=32, data_dir=str(glue_dir), plot_loss=True)
    written = train(config)
    png = (written.path / LOSS_PLOT_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # written with the checkpoint, so it is hashed like every other file and the directory still loads
    assert LOSS_PLOT_FILE in load_checkpoint(written.path).sidecar["files"]
    assert "plot_loss" not in written.sidecar["training"]["config"]
