"""Fisher merging with the factored diagonal: W = sum_t F_t W_t / sum_t F_t.

https://arxiv.org/abs/2111.09832 (Matena & Raffel, "Merging Models with
Fisher-Weighted Averaging"), in its diagonal form with uniform model weights.

F_t is the curvature each checkpoint recorded during training, not a Fisher
recomputed on data: with ``fisher="factored"`` (default) Adafactor's rank-1
second moment R_t C_t^T / mean(R_t) rebuilt from the row/column statistics
(the empirical-Fisher diagonal when G^2 is rank one); with ``fisher="full"``
the full diagonal "fisher/<name>" when the checkpoint stored it. ``eps`` is
added to every F_t so entries no task has curvature for fall back to the plain
average instead of dividing by zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Mapping

from umtam.merge.base import MergeMethod, MethodOptions, option

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class FisherOptions(MethodOptions):
    fisher: Literal["factored", "full"] = option(
        "factored", help="The rank-1 'factored' second moment or the 'full' diagonal.")
    eps: float = option(1e-12, ge=0, help="Added to every Fisher diagonal.")


def fisher_diagonals(group: TensorGroup, source: str) -> Tensor:
    import torch

    from umtam.saliency import full_fisher, second_moment

    read = {"factored": second_moment, "full": full_fisher}[source]
    return torch.stack([
        read(group.name, group.shape, stats, checkpoint_label=label, block=group.block)
        for stats, label in zip(group.stats, group.labels)
    ])


def fisher(group: TensorGroup, options: Mapping[str, Any]) -> Tensor:
    weights = fisher_diagonals(group, options["fisher"]) + options["eps"]
    return (weights * group.stacked).sum(dim=0) / weights.sum(dim=0)


def _stats_needed(options: Mapping[str, Any]) -> tuple[str, ...]:
    return ("second-moment",) if options["fisher"] == "factored" else ("fisher",)


METHOD = MergeMethod(
    name="fisher",
    merge=fisher,
    url="https://arxiv.org/abs/2111.09832",
    summary="curvature-weighted average of the weights",
    options=FisherOptions,
    needs_base=False,
    stats_needed=_stats_needed,
)
