"""What a task trains a model to do, and how it is scored: one registered objective per kind of task.

``classification`` (GLUE: a sequence-classification head on any family, the
GLUE metrics) and ``language`` (``lm`` and ``sft``: the causal LM itself,
token-weighted loss and perplexity). A task's spec names its kind
(umtam.tasks); training and evaluation ask ``objective_for(spec)`` for the
module that implements it. Each such module provides:

    ARCHITECTURE   "sequence-classification" or "causal-lm" (umtam.models)
    build_model(source, spec, *, from_config)   the model to train
    prepare(spec, config, tokenizer, max_length, progress) -> Prepared
    collate(features, pad_token_id) -> a batch of tensors with labels
    train_loss(forward, batch) -> the loss a training step minimises (forward: the model, or its DDP wrapper)
    evaluate(model, features, task, *, pad_token_id, batch_size, progress) -> metrics

Adding an objective is one module plus its registration below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from umtam.registry import Registry


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str  # the task kind it serves
    module: str
    summary: str


OBJECTIVES: Registry[ObjectiveSpec] = Registry("objective")
OBJECTIVES.register(ObjectiveSpec("classification", "umtam.objectives.classification",
                                  "a sequence-classification head; GLUE metrics"))
OBJECTIVES.register(ObjectiveSpec("language", "umtam.objectives.language",
                                  "the causal LM; token-weighted loss and perplexity"))


def objective_for(spec: Any) -> ModuleType:
    """The module implementing the objective of a task spec's kind."""
    return importlib.import_module(OBJECTIVES.get(spec.kind).module)


@dataclass
class Prepared:
    """A task's data, tokenized: what training reads and what its sidecar records about it.

    ``eval`` maps a split name to its features (dev for GLUE, validation text
    for a language task); ``holdout`` is the slice of train kept unseen for
    tuning; ``record`` holds task-record fields beyond labels and metrics (a
    language task's data name and where its validation text came from).
    """

    task_key: str
    train: list[dict]
    eval: dict[str, list[dict]]
    source: str
    holdout: list[dict] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)
