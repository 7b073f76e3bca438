"""Tasks by name: what a task's data looks like, which labels it has and how it is scored.

A ``TaskSpec`` owns everything task-specific: the Hugging Face column names,
the label names (in the HF label-id order), whether it is a regression, its
evaluation splits, where its canonical TSV files keep text and label, and
which metrics score it. Adding a task is one registration in the file of its
benchmark (glue.py registers the nine GLUE tasks); data loading
(umtam.data), metrics (umtam.metrics) and the command line read it from here.

    from umtam.tasks import get_task, TASKS
    get_task("SST-2").label_names   # ('negative', 'positive'); case, '-' and '_' ignored
"""

from __future__ import annotations

from dataclasses import dataclass

from umtam.registry import Registry


@dataclass(frozen=True)
class TsvLayout:
    """Where a canonical TSV keeps text and label: header names, or indices when headerless."""

    text_columns: tuple[str | int, ...]
    label_column: str | int
    eval_files: tuple[str, ...] = ("dev.tsv",)
    headerless_width: int | None = None  # CoLA train/dev have no header row


@dataclass(frozen=True)
class TaskSpec:
    """A classification or regression task over one or two texts."""

    name: str
    text_fields: tuple[str, ...]  # HF column names
    label_names: tuple[str, ...]  # HF label-id order; () for a regression
    is_regression: bool
    eval_splits: tuple[str, ...]
    glue_dir: str  # the canonical folder name ("SST-2")
    tsv: TsvLayout
    metrics: tuple[str, ...]  # umtam.metrics names; the task's score is their mean

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


@dataclass
class Example:
    """One labelled example: ``text_b`` is None for single-sentence tasks."""

    text_a: str
    text_b: str | None
    label: int | float


def normalise_task_name(name: str) -> str:
    # "SST-2", "sts_b" and "MRPC" are what people type; the keys are "sst2", "stsb", "mrpc".
    return name.strip().lower().replace("-", "").replace("_", "")


TASKS: Registry[TaskSpec] = Registry("task", normalise=normalise_task_name)


def get_task(name: str) -> TaskSpec:
    """The TaskSpec for a task name (case, '-' and '_' ignored); ConfigError listing the choices otherwise."""
    return TASKS.get(name)


from umtam.tasks import glue  # noqa: E402,F401  (registers the GLUE tasks)
