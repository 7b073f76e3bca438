"""DARE-TIES: DARE's drop-and-rescale in place of TIES's trim, then TIES's sign election.

https://arxiv.org/abs/2311.03099 (DARE) with https://arxiv.org/abs/2306.01708 (TIES).

T'_t = DARE(T_t) (seeded as in dare.py); sign = sign(sum_t T'_t); disjoint
``agg`` ("mean" by default, or "sum") of the surviving entries that agree with
it; W = W0 + lambda * delta. Entries no task keeps stay at W0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from umtam.merge.base import Aggregation, MergeMethod, option
from umtam.merge.dare import DareOptions, drop_streams, dropped_and_rescaled

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class DareTiesOptions(DareOptions):
    agg: Aggregation = option("mean", help="Disjoint mean (the paper) or sum of the agreeing entries.")


def dare_ties(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    from umtam.merge import ops

    vectors = dropped_and_rescaled(group, options)
    return group.base32 + options["lambda"] * ops.elect_and_merge(vectors, vectors != 0, options["agg"])


METHOD = MergeMethod(
    name="dare-ties",
    merge=dare_ties,
    url="https://arxiv.org/abs/2311.03099",
    summary="DARE drop-and-rescale, then TIES sign election and disjoint merge",
    options=DareTiesOptions,
    random_streams=drop_streams,
)
