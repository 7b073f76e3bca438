"""TIES merging: trim, elect sign, disjoint merge.

https://arxiv.org/abs/2306.01708 (Yadav et al., "TIES-Merging").

1. trim: keep each task's top ``keep`` fraction of entries by |T| (ranked by
   T^2, the same order). ``scope="global"`` (default, the paper's variant) ranks
   each task's entries over all its 2-D weights at once, with the threshold
   found exactly in the engine's prepare pass; ``scope="tensor"`` ranks within
   each tensor. Exactly k entries are kept: ties at the threshold are broken in
   a fixed order (tensors in name order, entries in row-major order).
2. elect: sign = sign(sum_t trimmed T_t), the sign of the larger total mass.
3. disjoint merge of the kept entries that agree with the elected sign:
   ``agg="mean"`` (the paper) averages over the agreeing tasks only,
   ``agg="sum"`` adds them. Entries where no task survives stay at W0.
4. W = W0 + lambda * delta (lambda 1.0 by default).

Variants by name: the paper's TIES is ``scope=global agg=mean``; mergekit's
``ties`` (with normalisation and equal weights) is ``scope=tensor agg=mean``.
The paper trims over every parameter; here 1-D parameters are left to the
engine's ``norms`` option. Default keep 0.2, the paper's top-20%.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from umtam.merge.base import Aggregation, MergeMethod, MethodOptions, Scope, keep_option, lambda_option, option, scope_option

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class TiesOptions(MethodOptions):
    keep: float = keep_option(0.2)
    scope: Scope = scope_option("global")
    agg: Aggregation = option("mean", help="Disjoint mean (the paper) or sum of the agreeing entries.")
    lambda_: float = lambda_option()


def ties_trim_scores(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    from umtam.merge import ops

    return ops.saliencies(group, "magnitude")


def ties(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    from umtam.merge import ops

    vectors = group.task_vectors
    masks = ops.top_fraction_masks(ties_trim_scores(group, options), options["keep"], group.thresholds)
    return group.base32 + options["lambda"] * ops.elect_and_merge(vectors, masks, options["agg"])


METHOD = MergeMethod(
    name="ties",
    merge=ties,
    url="https://arxiv.org/abs/2306.01708",
    summary="trim by magnitude, elect sign by mass, disjoint merge",
    options=TiesOptions,
    trim_scores=ties_trim_scores,
)
