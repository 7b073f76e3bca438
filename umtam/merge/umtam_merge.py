"""The umtam merge (DESIGN section 6): curvature trim, saliency-weighted election, curvature aggregation.

https://arxiv.org/abs/2512.17109 (UMTAM, "Bridging Training and Merging Through
Momentum-Aware Optimization").

For each 2-D weight, with T_t = W_t - W0 and s_t the saliency T_t^2 sqrt(R_i C_j):

1. trim: m_t = the top ``keep`` fraction of s_t, per tensor (default) or over
   all 2-D weights (``scope="global"``, exact thresholds from the prepare pass);
   ``trim="magnitude"`` ranks by T^2 instead (ablation). Exactly k entries are
   kept: ties at the threshold are broken in row-major order (saliency.Cut).
2. elect: sign = sign(sum_t m_t s_t sign(T_t)), a saliency-weighted vote;
   ``elect=False`` (ablation) skips it and every kept non-zero entry aggregates.
3. aggregate the kept entries that agree (a_t), weighted by each task's
   curvature c_t = sqrt(R_t C_t^T) divided by its mean over the tensor (so a
   task's overall gradient scale does not decide, only where it is curved):
   delta = sum_t a_t c_t T_t / sum_t a_t c_t; ``weights="uniform"`` (ablation)
   uses c_t = 1. A task whose statistics for a tensor are all zero (no gradient
   ever reached it) is refused when they are read (saliency.read_stat).
   The mean is mean(sqrt R) * mean(sqrt C), taken from the factors (equal to
   the dense mean up to rounding), so a row block is normalised like its tensor.
4. W = W0 + lambda * delta (lambda 1.0).

Entries where no task survives (trimmed, or disagreeing) stay at W0. Default
keep 0.2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping

from umtam.merge.base import MergeMethod, MethodOptions, ScoreName, Scope, keep_option, lambda_option, option, scope_option

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class UmtamOptions(MethodOptions):
    keep: float = keep_option(0.2)
    scope: Scope = scope_option("tensor")
    trim: ScoreName = option("curvature", help="Saliency that ranks entries ('magnitude': ablation).")
    elect: bool = option(True, flag="--elect/--no-elect",
                         help="Elect a sign per entry by importance-weighted vote (off: ablation).")
    weights: Literal["curvature", "uniform"] = option("curvature", help="Aggregation weights ('uniform': ablation).")
    lambda_: float = lambda_option()


def umtam_trim_scores(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    from umtam.merge import ops

    return ops.saliencies(group, options["trim"])


def curvatures(group: TensorGroup) -> Tensor:
    """sqrt(R_t C_t^T) of every task for this group's rows, stacked (K, ...)."""
    from umtam.merge import ops
    from umtam.saliency import curvature

    return ops.per_task_stats(group, curvature)


def curvature_weights(group: TensorGroup, raw: Tensor | None = None) -> Tensor:
    """c_t = sqrt(R_t C_t^T) / its mean over the whole tensor, per task, for this group's rows."""
    from umtam.merge import ops
    from umtam.saliency import curvature_mean

    means = [curvature_mean(group.name, group.tensor_shape, stats, checkpoint_label=label)
             for stats, label in zip(group.stats, group.labels)]
    return ops.per_input_mean_normalised(curvatures(group) if raw is None else raw, means)


def umtam(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    import torch

    from umtam.merge import ops

    vectors = group.task_vectors
    uses_curvature = options["weights"] == "curvature"
    raw = curvatures(group) if uses_curvature else None
    if options["trim"] == "curvature" and raw is not None:
        # The registry's curvature score T^2 * sqrt(R_i C_j), reusing the dense curvature
        # the weights need instead of building it twice.
        scores = ops.check_trim_scores(group, vectors.square().mul_(raw), "curvature")
    else:
        scores = umtam_trim_scores(group, options)
    masks = ops.top_fraction_masks(scores, options["keep"], group.thresholds)
    if options["elect"]:
        signs = torch.sign(vectors)
        elected = ops.elect_sign(masks.to(scores.dtype).mul_(scores).mul_(signs))
        selected = ops.agreeing(vectors, masks, elected, signs)
        del signs
    else:
        selected = masks & (vectors != 0)
    del scores, masks
    weights = curvature_weights(group, raw) if uses_curvature else torch.ones_like(vectors)
    delta = ops.weighted_mean(vectors, weights.mul_(selected.to(weights.dtype)))
    return group.base32 + options["lambda"] * delta


def _stats_needed(options: Mapping[str, Any]) -> tuple[str, ...]:
    return (options["trim"],) + (("curvature",) if options["weights"] == "curvature" else ())


METHOD = MergeMethod(
    name="umtam",
    merge=umtam,
    url="https://arxiv.org/abs/2512.17109",
    summary="curvature-saliency trim, weighted sign election, curvature-weighted aggregation",
    options=UmtamOptions,
    trim_scores=umtam_trim_scores,
    stats_needed=_stats_needed,
)
