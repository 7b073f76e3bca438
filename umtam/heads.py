"""Which tensors are task heads, and where a merged checkpoint keeps each task's head.

A task's head (``classifier.*`` for BERT; the model family says, umtam.families)
is fitted to that task alone: it is never pruned, merged or counted in the
base fingerprint. A merged checkpoint holds one encoder and every task's head
under ``heads/<task>/<key>``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from umtam.errors import CheckpointError
from umtam.families import ModelFamily, family_of_dir, generic_family

HEADS_PREFIX = "heads/"


def head_key(task: str, key: str) -> str:
    """Where a task's head tensor lives in a merged checkpoint."""
    return f"{HEADS_PREFIX}{task}/{key}"


def split_head_key(key: str) -> tuple[str, str] | None:
    """('task', 'classifier.weight') for a merged head key, else None."""
    if not key.startswith(HEADS_PREFIX):
        return None
    task, _, rest = key[len(HEADS_PREFIX):].partition("/")
    return (task, rest) if task and rest else None


def is_head_key(key: str, family: ModelFamily | None = None) -> bool:
    """A task-head tensor: the family's head, or a merged one (heads/<task>/...)."""
    return split_head_key(key) is not None or (family or generic_family()).is_head_key(key)


def encoder_tensors(state: Mapping[str, Any], family: ModelFamily | None = None) -> dict[str, Any]:
    """Everything but the heads: what fine-tuning shares across tasks."""
    return {key: value for key, value in state.items() if not is_head_key(key, family)}


def head_tensors(state: Mapping[str, Any], family: ModelFamily | None = None) -> dict[str, Any]:
    return {key: value for key, value in state.items() if is_head_key(key, family)}


# The head tensor whose rows are the labels, first present wins: BERT and DistilBERT
# classifier.weight, RoBERTa classifier.out_proj.weight (its classifier.dense is hidden x
# hidden), the decoders' score.weight. A family none of these fits: its last head tensor (in the
# order the file lists them).
LABEL_HEADS = ("classifier.out_proj.weight", "classifier.weight", "score.weight")


def label_head_key(keys: Sequence[str], family: ModelFamily | None = None) -> str | None:
    """Which of one task's head keys (without heads/<task>/) holds its label dimension first."""
    family = family or generic_family()
    for candidate in LABEL_HEADS:
        if candidate in keys and family.is_head_key(candidate):
            return candidate
    heads = [key for key in keys if family.is_head_key(key)]
    return heads[-1] if heads else None


def task_head_keys(tasks: Sequence[str], keys: Sequence[str], *, merged: bool,
                   family: ModelFamily | None = None) -> dict[str, dict[str, str]]:
    """{task: {head key as the model names it: key in the file}} for the heads the file holds.

    A merge keeps each task's head under heads/<task>/; a one-task checkpoint
    (train, prune) keeps its head under the model's own names. A bare head
    key in a merge, or in a file of several tasks, belongs to no task.
    """
    found: dict[str, dict[str, str]] = {task: {} for task in tasks}
    for key in keys:
        parsed = split_head_key(key)
        if parsed is not None and parsed[0] in found:
            found[parsed[0]][parsed[1]] = key
        elif parsed is None and not merged and len(found) == 1 and (family or generic_family()).is_head_key(key):
            found[tasks[0]].setdefault(key, key)
    return found


def check_head_labels(checkpoint_or_sidecar: Any, shapes: Mapping[str, Sequence[int]],
                      family: ModelFamily | None = None, where: str | None = None) -> None:
    """Every task's head has as many outputs as the sidecar has labels for it; CheckpointError otherwise.

    ``shapes`` are the weights' tensor shapes (from the safetensors header).
    With a Checkpoint the family comes from its config.json and the error names
    its model.safetensors; with a bare Sidecar pass ``family`` and ``where``.
    A task without a head in the file is left to the reader that needs it.
    """
    sidecar = getattr(checkpoint_or_sidecar, "sidecar", checkpoint_or_sidecar)
    path = getattr(checkpoint_or_sidecar, "path", None)
    if family is None and path is not None:
        family = family_of_dir(path)
    where = where or (str(checkpoint_or_sidecar.model_file) if path is not None else "the weights")
    heads = task_head_keys(list(sidecar.tasks), list(shapes), merged=sidecar.kind == "merge", family=family)
    for task, record in sidecar.tasks.items():
        key = label_head_key(list(heads[task]), family)
        if key is None:
            continue
        shape = list(shapes[heads[task][key]])
        labels = 1 if record.is_regression else len(record.label_names)
        if not shape or shape[0] != labels:
            outputs = f"{shape[0]} output(s)" if shape else "no output dimension"
            raise CheckpointError(
                f"{where}: head tensor {heads[task][key]!r} (shape {shape}) has {outputs} but task {task} has "
                f"{labels} label(s) in the sidecar",
                hint="the head and the sidecar disagree: one of them was edited, or copied from another checkpoint")
