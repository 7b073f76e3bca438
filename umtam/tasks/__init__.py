"""Tasks by name: what a task's data looks like, which labels it has and how it is scored.

Two kinds of task, each trained and scored by its objective (umtam.objectives):

- ``TaskSpec``, a classification or regression over one or two texts (GLUE):
  the Hugging Face column names, the label names (in the HF label-id order),
  whether it is a regression, its evaluation splits, where its canonical TSV
  files keep text and label, and which metrics score it.
- ``LanguageTask`` (language.py): causal language modelling on text the user
  names (``lm``) and instruction tuning on conversations (``sft``), scored by
  token-weighted loss and perplexity, and multiple-choice instruction tuning
  (``choice``), scored by how often the right answer is the likeliest.

Adding a task is one registration in the file of its benchmark (glue.py
registers the nine GLUE tasks); data loading (umtam.data, umtam.lm_data),
metrics (umtam.metrics) and the command line read it from here.

A checkpoint records a language task under ``<task>:<data name>``
("lm:tinyshakespeare"), so experts trained on different text stay distinct
tasks in a merge; ``task_spec`` maps such a key back to its spec.

    from umtam.tasks import get_task, TASKS
    get_task("SST-2").label_names   # ('negative', 'positive'); case, '-' and '_' ignored
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

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

    kind: ClassVar[str] = "classification"  # the objective that trains and scores it (umtam.objectives)
    higher_is_better: ClassVar[bool] = True

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


@dataclass(frozen=True)
class LanguageTask:
    """A causal-language-modelling task over text the user names (``--data``): no labels, no head."""

    name: str
    summary: str
    metrics: tuple[str, ...] = ("perplexity",)  # the score; loss and the token count are reported beside it
    higher_is_better: bool = False  # perplexity: lower is better

    kind: ClassVar[str] = "language"
    label_names: ClassVar[tuple[str, ...]] = ()
    is_regression: ClassVar[bool] = False
    num_labels: ClassVar[int] = 0


AnyTask = Union[TaskSpec, LanguageTask]
TASKS: Registry[AnyTask] = Registry("task", normalise=normalise_task_name)
KEY_SEPARATOR = ":"  # between a language task and its data name in a checkpoint's task key


def get_task(name: str) -> AnyTask:
    """The spec for a task name (case, '-' and '_' ignored); ConfigError listing the choices otherwise."""
    return TASKS.get(name)


def task_names(kind: str | None = None) -> tuple[str, ...]:
    """The registered task names, or those of one kind ("classification", "language")."""
    return tuple(spec.name for spec in TASKS if kind is None or spec.kind == kind)


def task_spec(key: str) -> AnyTask:
    """The spec of a checkpoint's task key: a registered name, or "<language task>:<data name>"."""
    task, separator, _data = key.partition(KEY_SEPARATOR)
    return TASKS.get(task if separator else key)


def language_task_key(task: str, data_name: str) -> str:
    """"lm:tinyshakespeare": how a checkpoint names a language task trained on ``data_name``."""
    return f"{task}{KEY_SEPARATOR}{data_name}"


def is_language_key(key: str) -> bool:
    task, separator, data_name = key.partition(KEY_SEPARATOR)
    return bool(separator and data_name) and task in TASKS and TASKS.get(task).kind == "language"


from umtam.tasks import glue, language  # noqa: E402,F401  (registers the GLUE and language tasks)
