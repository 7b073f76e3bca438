"""Uniform weight averaging ("model soup"): W = mean_t W_t.

https://arxiv.org/abs/2203.05482 (Wortsman et al., model soups). Needs no base
weights and no statistics; with a shared base it equals W0 + mean_t T_t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from umtam.merge.base import MergeMethod

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


def average(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    return group.stacked.mean(dim=0)


METHOD = MergeMethod(
    name="average",
    merge=average,
    url="https://arxiv.org/abs/2203.05482",
    summary="mean of the input weights",
    needs_base=False,
)
