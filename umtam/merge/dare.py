"""DARE: drop and rescale task-vector entries, then add them (task arithmetic).

https://arxiv.org/abs/2311.03099 (Yu et al., "Language Models are Super Mario").

Each entry of each task vector is dropped with probability ``drop`` and the
survivors are rescaled by 1 / (1 - drop), which keeps the expected task vector;
then W = W0 + lambda * sum_t T'_t (the paper combines DARE with task
arithmetic; lambda 1.0 by default). The random mask is seeded by
(seed, the input's task names, tensor name): reproducible, independent of the
order tensors are processed in and of the order the inputs are given. A tensor
merged in row blocks draws its masks from one generator per input, block after
block (``drop_streams``), so the masks are those of the whole tensor whatever
the block size. Default drop 0.5, a conservative rate for small encoders (the
paper drops up to 0.9 and more on large models).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from umtam.config.schema import SEED_LIMIT
from umtam.merge.base import MergeMethod, MethodOptions, lambda_option, option

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class DareOptions(MethodOptions):
    drop: float = option(0.5, ge=0, lt=1, help="Probability of dropping each task-vector entry.")
    seed: int = option(0, ge=0, lt=SEED_LIMIT, help="Seed of the drop masks.")
    lambda_: float = lambda_option()


def drop_generator(*, seed: int, task_id: str, name: str) -> torch.Generator:
    """The private generator of one task's tensor, at its first entry."""
    import torch

    digest = hashlib.sha256(f"{seed}\x00{task_id}\x00{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def drop_mask(shape: torch.Size, *, drop: float, seed: int, task_id: str, name: str,
              generator: torch.Generator | None = None) -> Tensor:
    """The entries DARE keeps (True) for one task's tensor, from a private generator.

    ``generator`` continues a tensor's stream for its next row block (one uniform
    draw per entry, in row-major order); without it the stream starts afresh.
    """
    import torch

    if generator is None:
        generator = drop_generator(seed=seed, task_id=task_id, name=name)
    return torch.rand(shape, generator=generator) >= drop


def drop_streams(name: str, task_ids: Sequence[str], options: Mapping[str, Any]) -> tuple[torch.Generator, ...]:
    """One generator per input for tensor ``name``, shared by its row blocks in order."""
    return tuple(drop_generator(seed=options["seed"], task_id=task_id, name=name) for task_id in task_ids)


def dropped_and_rescaled(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    """T'_t = T_t * keep_mask_t / (1 - drop), stacked (K, ...)."""
    import torch

    drop = options["drop"]
    streams = group.streams or (None,) * group.size
    masks = torch.stack([
        drop_mask(group.shape, drop=drop, seed=options["seed"], task_id=task_id, name=group.name,
                  generator=generator)
        for task_id, generator in zip(group.task_ids, streams)
    ])
    return group.task_vectors * masks / (1.0 - drop)


def dare(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    return group.base32 + options["lambda"] * dropped_and_rescaled(group, options).sum(dim=0)


METHOD = MergeMethod(
    name="dare",
    merge=dare,
    url="https://arxiv.org/abs/2311.03099",
    summary="drop entries with probability p, rescale by 1/(1-p), sum",
    options=DareOptions,
    random_streams=drop_streams,
)
