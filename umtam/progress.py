"""Progress reporting for the library's long loops: callbacks, never printing (the CLI renders).

Two callback shapes exist: training and evaluation report events,
``progress(kind, payload)`` with kind "start", "step", "advance", "status" or
"end"; prune and merge report tensors done, ``progress(done, total, name)``,
counted by ``ProgressSteps``.
"""

from __future__ import annotations

from typing import Any, Callable

ProgressFn = Callable[[str, Any], None]  # (kind, payload) events
Progress = Callable[[int, int, str], None]  # (done, total, name) of a tensor loop


def no_progress(kind: str, payload: Any) -> None:
    return None


class ProgressSteps:
    """Counts work for the optional progress(done, total, name) callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def advance(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, name)
