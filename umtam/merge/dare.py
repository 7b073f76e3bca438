"""DARE: drop and rescale task-vector entries, then add them (task arithmetic).

https://arxiv.org/abs/2311.03099 (Yu et al., "Language Models are Super Mario").

Each entry of each task vector is dropped with probability ``drop`` and the
survivors are rescaled by 1 / (1 - drop), which keeps the expected task vector;
then W = W0 + lambda * sum_t T'_t (the paper combines DARE with task
arithmetic; lambda 1.0 by default). The random mask is seeded by
(seed, the input's task names, tensor name): reproducible, independent of the
order tensors are processed in and of the order the inputs are given. Default
drop 0.5, a conservative rate for small encoders (the paper drops up to 0.9 and
more on large models).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch import Tensor

from umtam.merge.base import MergeMethod, Option, TensorGroup, finite_number, integer, probability_below_one


def drop_mask(shape: torch.Size, *, drop: float, seed: int, task_id: str, name: str) -> Tensor:
    """The entries DARE keeps (True) for one task's tensor, from a private generator."""
    digest = hashlib.sha256(f"{seed}\x00{task_id}\x00{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.rand(shape, generator=generator) >= drop


def dropped_and_rescaled(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    """T'_t = T_t * keep_mask_t / (1 - drop), stacked (K, ...)."""
    drop = options["drop"]
    masks = torch.stack([
        drop_mask(group.shape, drop=drop, seed=options["seed"], task_id=task_id, name=group.name)
        for task_id in group.task_ids
    ])
    return group.task_vectors * masks / (1.0 - drop)


def dare(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    return group.base32 + options["lambda"] * dropped_and_rescaled(group, options).sum(dim=0)


DARE_OPTIONS = {
    "drop": Option(0.5, probability_below_one, "probability of dropping each task-vector entry"),
    "seed": Option(0, integer, "seed of the drop masks"),
    "lambda": Option(1.0, finite_number, "scale of the merged task vector"),
}

METHOD = MergeMethod(
    name="dare",
    merge=dare,
    url="https://arxiv.org/abs/2311.03099",
    summary="drop entries with probability p, rescale by 1/(1-p), sum",
    options=DARE_OPTIONS,
)
