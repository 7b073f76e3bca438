"""One tensor of every merge input, as a method sees it (the engine builds these).

A group may be a row block of a tensor (``group.block``): every method is
elementwise across the K inputs once its per-tensor quantities are fixed, so
the engine merges a large tensor a few rows at a time. Per-tensor quantities
are then passed in (trim thresholds) or derived from the whole tensor's
statistics (curvature means, mean(R)), never from the block's own entries, and
the rows merged in blocks equal the rows of the whole-tensor merge bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import torch
from torch import Tensor

from umtam.saliency import RowBlock, Selection, whole_shape


@dataclass(frozen=True)
class TensorGroup:
    """One tensor of every input: W_t for t = 1..K, the base W0, and per-input statistics.

    ``labels`` name the inputs in error messages (checkpoint paths); ``task_ids``
    identify them stably (their task names) so that seeded methods do not depend
    on input order. ``thresholds`` carries per-input trim cuts from the engine,
    as ``saliency.Selection``s: global ones from its prepare pass, or this
    tensor's own when the engine splits it into row blocks (None: the method
    trims per tensor itself). A Selection's tie allowance is used up by the
    groups in the order they are merged (rows in order, tensors in name
    order), so a method trims each group once. A plain float t instead keeps
    every entry >= t (an explicit threshold, e.g. a hand-computed test).

    ``block`` says which rows of the whole tensor the weights hold (None: all of
    them); statistics are always the whole tensor's. ``streams`` are per-input
    random generators positioned at this block's first entry, shared by the
    blocks of one tensor in row order (None: a seeded method starts its own at
    the tensor's first entry).
    """

    name: str
    weights: tuple[Tensor, ...]
    base: Tensor | None = None
    stats: tuple[Mapping[str, Tensor], ...] = ()
    labels: tuple[str, ...] = ()
    task_ids: tuple[str, ...] = ()
    thresholds: tuple[Selection | float, ...] | None = None
    block: RowBlock | None = None
    streams: tuple[torch.Generator, ...] | None = None

    def __post_init__(self):
        count = len(self.weights)
        if not self.stats:
            object.__setattr__(self, "stats", tuple({} for _ in range(count)))
        if not self.labels:
            object.__setattr__(self, "labels", tuple(f"input {i + 1}" for i in range(count)))
        if not self.task_ids:
            object.__setattr__(self, "task_ids", tuple(str(i) for i in range(count)))

    @property
    def size(self) -> int:
        return len(self.weights)

    @property
    def shape(self) -> torch.Size:
        """The shape of the weights held: the row block's, or the whole tensor's."""
        return self.weights[0].shape

    @property
    def tensor_shape(self) -> torch.Size:
        """The whole tensor's shape, also for a row block."""
        return whole_shape(self.shape, self.block)

    @cached_property
    def stacked(self) -> Tensor:
        """W_t stacked on a new leading axis, in float32."""
        return torch.stack([w.to(torch.float32) for w in self.weights])

    @cached_property
    def base32(self) -> Tensor:
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs the base weights W0")
        return self.base.to(torch.float32)

    @cached_property
    def task_vectors(self) -> Tensor:
        """T_t = W_t - W0, stacked (K, *shape)."""
        # Each difference written straight into its slot: one pass, one (K, *shape) buffer.
        vectors = torch.empty((self.size, *self.shape), dtype=torch.float32)
        for slot, weight in zip(vectors, self.weights):
            torch.sub(_float32_operand(weight), self.base32, out=slot)
        return vectors

    def task_vector_sum(self) -> Tensor:
        """sum_t T_t in float32, accumulated in input order, without the stacked (K, *shape) buffer.

        Two float32 buffers however large K is, and each T_t made straight from
        the stored weight (the subtraction promotes it to float32 exactly).
        """
        total = torch.sub(_float32_operand(self.weights[0]), self.base32)
        if self.size > 1:
            vector = torch.empty_like(total)
            for weight in self.weights[1:]:
                total.add_(torch.sub(_float32_operand(weight), self.base32, out=vector))
        return total


def _float32_operand(weight: Tensor) -> Tensor:
    """``weight`` as an operand of float32 arithmetic: 16-bit floats as they are (an op with a
    float32 tensor promotes them exactly, with no float32 copy made), wider dtypes cast down."""
    return weight if torch.promote_types(weight.dtype, torch.float32) == torch.float32 else weight.to(torch.float32)
