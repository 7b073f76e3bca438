"""OTA merging with Fast Fisher Grafting: sqrt(v)-weighted task vectors under saliency masks.

https://arxiv.org/abs/2509.11167 ("Harnessing Optimization
Dynamics for Curvature-Informed Model Merging"), following the authors'
mergekit implementation (github.com/pmahdavi/ota-merge): graft, then aggregate.

    v_t  = R_t C_t^T / mean(R_t)          the paper's rank-1 compressed second moment
    m_t  = top-``keep`` entries of T_t^2 * v_t   (Fast Fisher Grafting; ``graft`` picks
                                          another saliency, e.g. "curvature")
    P_t  = v_t ** power + eps             (power 0.5: sqrt(v), the Adam preconditioner)
    delta = sum_t P_t m_t T_t / sum_t P_t          (denominator="all", the paper:
                                          an OTA average of the grafted experts W0 + m_t T_t)
    delta = sum_t P_t m_t T_t / sum_t P_t m_t      (denominator="kept": grafted-out
                                          entries do not pull towards W0)
    W = W0 + delta

``normalise="mean"`` divides each P_t by its mean over the tensor first (the
reference's "global" normalisation; the mean, mean(R^p) mean(C^p) / mean(R)^p,
comes from the factors, so a row block is normalised like its tensor); the
default "none" compares raw curvature across tasks, as the reference does.
Grafting is per tensor by default (``scope="global"`` ranks over all 2-D
weights). Default keep 0.2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping

from umtam.merge.base import MergeMethod, MethodOptions, ScoreName, Scope, keep_option, option, scope_option

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class OtaOptions(MethodOptions):
    keep: float = keep_option(0.2)
    scope: Scope = scope_option("tensor")
    graft: ScoreName = option("second-moment", help="Saliency that ranks entries for grafting.")
    power: float = option(0.5, gt=0, help="P = v ** power.")
    normalise: Literal["none", "mean"] = option("none", help="Divide each P_t by its mean per tensor.")
    denominator: Literal["all", "kept"] = option("all", help="Normalise by every P_t or the kept ones only.")
    eps: float = option(1e-8, ge=0, help="Added to P_t.")


def ota_trim_scores(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    from umtam.merge import ops

    return ops.saliencies(group, options["graft"])


def second_moments(group: TensorGroup) -> Tensor:
    """v_t = R_t C_t^T / mean(R_t) of every task for this group's rows, stacked (K, ...)."""
    from umtam.merge import ops
    from umtam.saliency import second_moment

    return ops.per_task_stats(group, second_moment)


def preconditioner_weights(group: TensorGroup, options: Mapping[str, Any], moments: Tensor | None = None) -> Tensor:
    from umtam.merge import ops
    from umtam.saliency import second_moment_mean

    weights = (second_moments(group) if moments is None else moments).pow(options["power"])
    if options["normalise"] == "mean":
        means = [second_moment_mean(group.name, group.tensor_shape, stats, checkpoint_label=label,
                                    power=options["power"])
                 for stats, label in zip(group.stats, group.labels)]
        weights = ops.per_input_mean_normalised(weights, means)
    return weights + options["eps"]


def ota(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    from umtam.merge import ops

    vectors = group.task_vectors
    moments = second_moments(group)
    if options["graft"] == "second-moment":
        # The registry's second-moment score T^2 * v, reusing the dense v the weights need.
        scores = ops.check_trim_scores(group, vectors.square().mul_(moments), "second-moment")
    else:
        scores = ota_trim_scores(group, options)
    masks = ops.top_fraction_masks(scores, options["keep"], group.thresholds)
    del scores
    weights = preconditioner_weights(group, options, moments)
    del moments
    if options["denominator"] == "kept":
        delta = ops.weighted_mean(vectors, weights * masks)
    else:
        delta = (weights * masks * vectors).sum(dim=0) / weights.sum(dim=0)
    return group.base32 + delta


def _stats_needed(options: Mapping[str, Any]) -> tuple[str, ...]:
    return (options["graft"], "second-moment")


METHOD = MergeMethod(
    name="ota",
    merge=ota,
    url="https://arxiv.org/abs/2509.11167",
    summary="Fast Fisher Grafting masks, then sqrt(v)-weighted aggregation",
    options=OtaOptions,
    trim_scores=ota_trim_scores,
    stats_needed=_stats_needed,
)
