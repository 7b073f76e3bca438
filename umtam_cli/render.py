"""Rendering shared by the subcommands: JSON or rich tables on stdout, progress on stderr."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any, Iterator

import click


def common_output_options(function):
    """--json / --quiet / --verbose, identical on every subcommand."""
    function = click.option("--verbose", "-v", is_flag=True, help="Log each stage on stderr.")(function)
    function = click.option("--quiet", "-q", is_flag=True, help="No progress or logs on stderr.")(function)
    function = click.option("--json", "as_json", is_flag=True,
                            help="Print one JSON document on stdout instead of a table.")(function)
    return function


def recipe_option(function):
    """--config FILE.yaml: a recipe with the command's option keys; flags given beside it win."""
    return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                        help="YAML recipe with the same keys as the options; flags win.")(function)


def emit_json(payload: Any) -> None:
    """One JSON document on stdout, valid whatever the payload holds.

    A NaN or infinite float (a diverged metric, a ratio over zero) is written
    as null: json.dumps would write bare NaN / Infinity, which no strict JSON
    parser (jq, JavaScript, Go) accepts. allow_nan=False then guards the rule.
    """
    click.echo(json.dumps(finite_json(payload), indent=2, sort_keys=True, default=str, allow_nan=False))


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf, -inf) replaced by None, containers rebuilt."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def stdout_console():
    from rich.console import Console

    return Console(soft_wrap=False)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"  # metrics read 0.8754, learning rates 0.0002 and eps 1e-08
    return "-" if value is None else str(value)


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class ProgressRenderer:
    """Turns the library's progress(kind, payload) events into rich bars on stderr.

    Bars are drawn only when stderr is a terminal and --quiet is off, so pipes
    and CI logs stay clean; status lines are logged with --verbose.
    """

    def __init__(self, *, quiet: bool = False, verbose: bool = False, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.verbose = verbose
        self.draw_bars = not quiet and self.console.is_terminal
        self._progress = None
        self._task = None
        self._unit = "examples"  # what "advance" counts; a bar's start may name another

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "status":
            if self.verbose and not self.quiet:
                self.console.print(f"[dim]umtam:[/dim] {payload}", highlight=False, soft_wrap=True)
        elif kind == "start" and self.draw_bars:
            self._start(payload)
        elif kind in ("step", "advance") and self._progress is not None:
            self._advance(kind, payload)
        elif kind == "end" and self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _start(self, payload: dict) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=self.console, transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(payload["what"], total=payload["total"], info="", rate="")
        self._unit = payload.get("unit", "examples")

    def _advance(self, kind: str, payload: Any) -> None:
        task = self._progress.tasks[0]
        if kind == "step":
            rate = f"{task.speed:.2f} steps/s" if task.speed else ""
            self._progress.update(self._task, completed=payload.step, info=f"loss {payload.loss:.4f}", rate=rate)
        else:
            # "advance" carries a count, or (count, label) when there is something to name (a tensor)
            count, info = payload if isinstance(payload, tuple) else (payload, task.fields["info"])
            self._progress.update(self._task, advance=count, info=info)
            rate = f"{task.speed:.1f} {self._unit}/s" if task.speed else ""
            self._progress.update(self._task, rate=rate)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextmanager
def progress_renderer(*, quiet: bool, verbose: bool) -> Iterator[ProgressRenderer]:
    renderer = ProgressRenderer(quiet=quiet, verbose=verbose)
    try:
        yield renderer
    finally:
        renderer.close()


def per_tensor_progress(renderer: ProgressRenderer, what: str):
    """Adapt the library's progress(done, total, name) callback (prune, merge) to the renderer."""
    state = {"started": False}

    def progress(done: int, total: int, name: str) -> None:
        if not state["started"]:
            renderer("start", {"total": total, "what": what, "unit": "tensors"})
            state["started"] = True
        renderer("advance", (1, name))
        if done >= total:
            renderer("end", {"what": what})
            state["started"] = False

    return progress
