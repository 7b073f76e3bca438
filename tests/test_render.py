"""Progress bars tell the truth: counts, rate and ETA on a terminal; nothing in a pipe or with --quiet."""

from __future__ import annotations

import io

from rich.console import Console

from umtam.train import StepEvent
from umtam_cli.render import ProgressRenderer, per_tensor_progress


class Clock:
    """A controllable clock, so rates and ETAs are exact."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def terminal(clock: Clock | None = None) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160, color_system=None,
                      get_time=clock or Clock())
    return console, buffer


def pipe() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=160), buffer


def drive_training(renderer: ProgressRenderer, steps: int = 4) -> None:
    renderer("start", {"total": steps, "what": "train"})
    for step in range(1, steps + 1):
        renderer("step", StepEvent(step, steps, 1.0 / step, 0))
    renderer("end", {"what": "train"})


def test_training_bar_shows_steps_loss_rate_and_eta_on_a_terminal():
    clock = Clock()
    console, buffer = terminal(clock)
    renderer = ProgressRenderer(console=console)
    renderer("start", {"total": 10, "what": "train"})
    for step in range(1, 5):
        clock.now += 2.0  # one step every 2 s
        renderer("step", StepEvent(step, 10, 0.5, 0))
    task = renderer._progress.tasks[0]
    assert task.completed == 4 and task.total == 10 and task.fields["info"] == "loss 0.5000"
    assert task.speed == 0.5 and task.time_remaining == 12.0  # 6 steps left at 0.5 steps/s
    renderer._progress.refresh()
    shown = buffer.getvalue()
    assert "4/10" in shown and "loss 0.5000" in shown and "0:00:12" in shown
    renderer("end", {"what": "train"})


def test_eval_bar_counts_examples_and_shows_their_rate():
    clock = Clock()
    console, buffer = terminal(clock)
    renderer = ProgressRenderer(console=console)
    renderer("start", {"total": 256, "what": "eval mrpc"})
    for _ in range(3):
        clock.now += 0.5
        renderer("advance", 64)
    task = renderer._progress.tasks[0]
    assert task.completed == 192 and task.fields["rate"] == "128.0 examples/s"
    renderer("end", {"what": "eval mrpc"})


def test_per_tensor_progress_counts_tensors_and_names_the_current_one():
    console, buffer = terminal()
    renderer = ProgressRenderer(console=console)
    progress = per_tensor_progress(renderer, "merge")
    progress(1, 3, "encoder.layer.0.attention.self.query.weight")
    task = renderer._progress.tasks[0]
    assert (task.completed, task.total) == (1, 3)
    assert task.fields["info"] == "encoder.layer.0.attention.self.query.weight"
    progress(2, 3, "b")
    progress(3, 3, "c")
    assert renderer._progress is None  # the last tensor closes the bar
    assert "merge" in buffer.getvalue()


def test_nothing_is_drawn_in_a_pipe():
    console, buffer = pipe()
    renderer = ProgressRenderer(console=console)
    drive_training(renderer)
    per_tensor_progress(renderer, "prune")(1, 1, "w")
    assert buffer.getvalue() == ""


def test_quiet_silences_bars_and_status_even_on_a_terminal():
    console, buffer = terminal()
    renderer = ProgressRenderer(quiet=True, verbose=True, console=console)
    renderer("status", "loading model")
    drive_training(renderer)
    assert buffer.getvalue() == ""


def test_status_lines_only_with_verbose():
    console, buffer = pipe()
    ProgressRenderer(console=console)("status", "loading model")
    assert buffer.getvalue() == ""
    ProgressRenderer(verbose=True, console=console)("status", "loading model")
    assert "loading model" in buffer.getvalue()
