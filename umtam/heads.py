"""Which tensors are task heads, and where a merged checkpoint keeps each task's head.

A task's head (``classifier.*`` for BERT; the model family says, umtam.families)
is fitted to that task alone: it is never pruned, merged or counted in the
base fingerprint. A merged checkpoint holds one encoder and every task's head
under ``heads/<task>/<key>``.
"""

from __future__ import annotations

from typing import Any, Mapping

from umtam.families import ModelFamily, generic_family

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
