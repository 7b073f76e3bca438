"""GaLore-AdamW: Adam in a low-rank projection of the gradient, refreshed every T steps.

Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", https://arxiv.org/abs/2403.03507.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from umtam.optim.common import (
    adam_arguments,
    FP32StateOptimizer,
    WorkingMatrix,
    check_common_hparams,
    check_rank,
    clamped_rank,
    grad_matrix,
    state_dtype,
)
from umtam.optim.functional import adam_denominator, adam_moments_update_, lowrank_step_


def galore_projector(G: Tensor, rank: int) -> Tensor:
    """GaLore's projector from a gradient: top-r singular vectors of the smaller side.

    For m >= n the right vectors ``Vh[:r]`` (r x n, the gradient is projected
    as ``G P^T``), else the left vectors ``U[:, :r]`` (m x r, ``P^T G``): the
    official ``proj_type="std"``. A full ``torch.linalg.svd`` of G, as the
    paper does every T steps; deterministic.
    """
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    if G.shape[0] >= G.shape[1]:
        return Vh[:rank].contiguous()
    return U[:, :rank].contiguous()


def galore_project(G: Tensor, P: Tensor) -> Tensor:
    """Projected gradient: ``G P^T`` (m x r) for a right projector, ``P^T G`` (r x n) for a left one."""
    return G @ P.T if G.shape[0] >= G.shape[1] else P.T @ G


def galore_project_back(N: Tensor, P: Tensor, full_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Inverse map of ``galore_project`` as factors (A, B), ``A B^T = N P`` or ``P N`` (m x n, never formed)."""
    return (N, P.T) if full_shape[0] >= full_shape[1] else (P, N.T)


class GaLoreAdamW(FP32StateOptimizer):
    r"""GaLore-AdamW (``proj_type="std"``): AdamW moments in an r-dimensional projection of each matrix gradient.

    For a parameter of rank >= 2 (viewed as m x n), with r clamped to min(m, n):
    every ``update_proj_gap`` steps (steps 1, T+1, 2T+1, ...) the projector P
    is recomputed from the current gradient by an SVD (top-r singular vectors
    of the smaller side); then ``R = project(G)``, Adam moments of R (not reset
    when P changes, as the official code), ``N = m_hat / (sqrt(v_hat) + eps)``,
    ``W <- W - lr (scale * project_back(N) + wd W)``. Parameters of rank < 2
    get plain AdamW.

    Implemented here rather than wrapping the ``galore-torch`` package: version
    1.0 does not import without ``bitsandbytes`` (its ``__init__`` imports the
    8-bit variant), and it keeps a ``GaLoreProjector`` Python object in the
    optimizer state, so ``state_dict()`` cannot go through safetensors and a
    resumed run cannot restore the projector. Here the projector is a tensor
    ``state["P"]``. Differences from galore-torch's AdamW, both small: eps is
    added after bias correction (torch.optim.AdamW's placement; galore-torch
    uses HF's legacy AdamW, which adds it before, i.e. an eps larger by
    1/sqrt(1-b2^t) in the first ~1/(1-b2) steps), and weight decay multiplies
    W before the step rather than after (an O(lr^2) difference).
    ``tests/optim_reference.py`` holds a slow reference of the algorithm.

    Args:
        params: parameters or param-group dicts.
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        rank: projection rank r.
        update_proj_gap: T, steps between projector refreshes (paper: 200).
        scale: alpha, the multiplier of the projected-back update (paper: 0.25).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
        update_proj_gap: int = 200,
        scale: float = 0.25,
    ):
        betas = check_common_hparams(lr, betas, eps, weight_decay)
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
            raise ValueError(f"Invalid update_proj_gap: {update_proj_gap!r} (must be an integer >= 1)")
        if not scale > 0.0:
            raise ValueError(f"Invalid scale: {scale} (must be > 0)")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=check_rank(rank),
            update_proj_gap=update_proj_gap,
            scale=scale,
        )
        super().__init__(params, defaults)

    def _matrix_step(self, p: Tensor, group: dict[str, Any]) -> None:
        dtype = state_dtype(p)
        G = grad_matrix(p, dtype)
        rank = clamped_rank(group["rank"], G.shape)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["step"] += 1
        step = state["step"].item()
        if (int(step) - 1) % group["update_proj_gap"] == 0 or "P" not in state:
            state["P"] = galore_projector(G, rank)
        low = galore_project(G, state["P"])
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low)
            state["exp_avg_sq"] = torch.zeros_like(low)
        beta1, beta2 = group["betas"]
        adam_moments_update_(state["exp_avg"], state["exp_avg_sq"], low, beta1, beta2)
        direction = state["exp_avg"] / adam_denominator(state["exp_avg_sq"], step, beta2, group["eps"])
        left, right = galore_project_back(direction, state["P"], G.shape)

        work = WorkingMatrix(p, p.dtype)
        lowrank_step_(
            work.w,
            left,
            right,
            step_size=group["lr"] * group["scale"] / (1.0 - beta1**step),
            decay=1.0 - group["lr"] * group["weight_decay"],
        )
        work.commit()

    def factored_second_moment(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """Always None: GaLore's moments live in the projected space, so a tracker collects R and C itself."""
        return None


def build(groups: list[dict[str, Any]], hp) -> GaLoreAdamW:
    """The registry's builder (umtam.optim.registry): ``hp`` is a Hyperparameters."""
    return GaLoreAdamW(groups, rank=hp.rank, **adam_arguments(hp))
