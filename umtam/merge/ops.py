"""Building blocks shared by the merge methods: trim, elect, aggregate.

All functions take stacked tensors with the input axis first, shape (K, ...).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from umtam.saliency import Selection, check_scores, score, tensor_cut

from umtam.merge.group import TensorGroup


def per_task_stats(group: TensorGroup, dense_stat) -> Tensor:
    """A dense statistic (saliency.curvature, saliency.second_moment) of every input, stacked (K, ...)."""
    return torch.stack([
        dense_stat(group.name, group.shape, stats, checkpoint_label=label, block=group.block)
        for stats, label in zip(group.stats, group.labels)
    ])


def saliencies(group: TensorGroup, method: str) -> Tensor:
    """Each input's saliency of its task vector under the named score, stacked (K, ...)."""
    return torch.stack([
        score(method, group.name, vector, stats, checkpoint_label=label, block=group.block)
        for vector, stats, label in zip(group.task_vectors, group.stats, group.labels)
    ])


def top_fraction_masks(scores: Tensor, keep: float, thresholds: Sequence[Selection | float] | None = None) -> Tensor:
    """Per input, exactly its top-k entries: those above the threshold, then tied ones in row-major order.

    Without ``thresholds`` each input keeps k = keep_count(keep, n) of its own
    n scores in this tensor (per-tensor trim, saliency.tensor_cut). With them,
    one per input from the engine (TensorGroup.thresholds): a Selection, whose
    tie allowance this group's rows use up (a global trim's, shared by every
    tensor in name order, or this tensor's, shared by its row blocks), or a
    plain float t, which keeps every entry >= t.
    """
    masks = torch.empty(scores.shape, dtype=torch.bool)
    for index, (slot, own) in enumerate(zip(masks, scores)):
        given = None if thresholds is None else thresholds[index]
        if given is None:
            selection = Selection(tensor_cut(own, keep))
        else:
            selection = given if isinstance(given, Selection) else Selection.at_least(float(given))
        selection.mask(own, out=slot)
    return masks


def check_trim_scores(group: TensorGroup, scores: Tensor, score_name: str) -> Tensor:
    """Scores a method built itself (not through saliency.score) must be finite too; returns them."""
    for own, label in zip(scores, group.labels):
        check_scores(own, score_name=score_name, tensor_name=group.name, checkpoint_label=label)
    return scores


def elect_sign(values: Tensor) -> Tensor:
    """sign(sum_t values_t): +1, -1, or 0 where the inputs cancel exactly."""
    return torch.sign(values.sum(dim=0))


def agreeing(task_vectors: Tensor, masks: Tensor, elected: Tensor, signs: Tensor | None = None) -> Tensor:
    """Kept entries whose sign matches the elected sign (zeros never agree).

    ``signs`` is torch.sign(task_vectors) when the caller already has it.
    """
    signs = torch.sign(task_vectors) if signs is None else signs
    return masks & (signs == elected) & (elected != 0)


def disjoint_mean(task_vectors: Tensor, selected: Tensor) -> Tensor:
    """Mean over the selected inputs only; 0 where none is selected (TIES's disjoint merge)."""
    total = (task_vectors * selected).sum(dim=0)
    count = selected.sum(dim=0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def disjoint_sum(task_vectors: Tensor, selected: Tensor) -> Tensor:
    return (task_vectors * selected).sum(dim=0)


def weighted_mean(task_vectors: Tensor, weights: Tensor) -> Tensor:
    """sum_t w_t T_t / sum_t w_t; 0 where the weights sum to zero (nothing survives -> W0)."""
    numerator = (weights * task_vectors).sum(dim=0)
    denominator = weights.sum(dim=0)
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def aggregate(task_vectors: Tensor, selected: Tensor, how: str) -> Tensor:
    if how == "mean":
        return disjoint_mean(task_vectors, selected)
    if how == "sum":
        return disjoint_sum(task_vectors, selected)
    raise ValueError(f"unknown aggregation {how!r}")


def elect_and_merge(task_vectors: Tensor, masks: Tensor, how: str) -> Tensor:
    """TIES steps 2-3 on the kept entries: elect each entry's sign by kept mass, then aggregate the
    kept entries that agree with it (disjoint mean or sum)."""
    elected = elect_sign(task_vectors * masks)
    return aggregate(task_vectors, agreeing(task_vectors, masks, elected), how)


def per_input_mean_normalised(values: Tensor, means: Sequence[float]) -> Tensor:
    """Divide each input's values by its own mean over the whole tensor; a zero mean gives all ones.

    The means are passed in (computed from the statistics' factors) rather than
    taken over ``values``, which may be one row block of the tensor. Statistics
    that are all zero are refused when read (saliency.read_stat), so a zero
    mean is left only where a mean of tiny values underflows; the fallback
    keeps such an input at uniform weight instead of silently dropping it.
    """
    means = torch.tensor(list(means), dtype=values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    positive = means > 0
    normalised = values / torch.where(positive, means, torch.ones_like(means))
    if bool(positive.all()):
        return normalised
    return torch.where(positive, normalised, torch.ones_like(values))
