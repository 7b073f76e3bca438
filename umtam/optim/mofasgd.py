"""MoFaSGD: momentum-factorized SGD with spectrally normalised steps.

Paper: Mahdavinia & Mahdavi, "Low-rank Momentum Factorization for Memory
Efficient Training", https://arxiv.org/abs/2507.08091 (TMLR 2025).
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
from umtam.optim.functional import (
    init_factors_from_gradient,
    lowrank_momentum_update,
    lowrank_step_,
    scan_gradient,
)


def orthogonalized_factors(U: Tensor, s: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (A, B) with ``A B^T = U V^T`` over the momentum's numerically nonzero singular values.

    Directions whose singular value is at most ``max(s) * max(m, n) * machine
    eps`` (the ``torch.linalg.clamped_rank`` tolerance) carry no momentum: the
    SVD returns arbitrary orthonormal vectors for them (a rank-1 gradient at
    r = 8, or an all-zero one), which ``U V^T`` would turn into full-size steps.
    Their columns of U are zeroed.
    """
    tol = s.max() * max(U.shape[0], V.shape[0]) * torch.finfo(s.dtype).eps
    return torch.where((s > tol).unsqueeze(0), U, 0.0), V


class MoFaSGD(FP32StateOptimizer):
    r"""Low-rank momentum (MoFaSGD's tangent-space update) with the step ``W <- W - lr U V^T``.

    Variant: the paper's orthogonalised step ``U_{t+1} V_{t+1}^T`` (the
    momentum's singular values dropped, so every nonzero singular value of the
    update equals ``lr``) with decoupled weight decay, without the optional
    second-moment scaling and without the reference code's ``eta2`` term for
    the gradient outside the tangent space. The momentum update is the same
    as UMTAM's (``functional.lowrank_momentum_update``): ``M~ = b1 U diag(s)
    V^T + (1-b1) P_T(G)``, truncated to rank r by two thin QRs and a 2r x 2r
    SVD; factors start from a rank-r SVD of the first gradient.

    The step is scale-free (bias correction would not change it) and its
    spectral norm is ``lr``, so its per-entry size is about
    ``lr sqrt(r / (m n))``: a learning rate comparable to AdamW's needs to be
    larger by roughly sqrt(mn / r). Parameters of rank < 2 use AdamW with the
    same ``lr``; give them their own param group to tune them separately.

    State per matrix: U, s, V and ``step``: (m + n) r + r floats.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (spectral norm of each matrix step).
        betas: b1 is the momentum rate (0.95 as the paper's runs); both are
            AdamW's betas for vectors.
        eps: AdamW's epsilon for vectors.
        weight_decay: decoupled weight decay.
        rank: momentum rank r (clamped to min(m, n)).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
    ):
        betas = check_common_hparams(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=check_rank(rank))
        super().__init__(params, defaults)

    def _matrix_step(self, p: Tensor, group: dict[str, Any]) -> None:
        dtype = state_dtype(p)
        G = grad_matrix(p, dtype)
        rank = clamped_rank(group["rank"], G.shape)
        state = self.state[p]
        if not state:
            U, _, V = init_factors_from_gradient(G, rank)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["U"], state["s"], state["V"] = U, torch.zeros(rank, dtype=dtype, device=G.device), V
        state["step"] += 1
        U, s, V = state["U"], state["s"], state["V"]
        if G.device.type == "cpu":
            # the blocked pass reads G once for both products (see functional.scan_gradient)
            scan = scan_gradient(G, U, V)
            U, s, V = lowrank_momentum_update(U, s, V, None, group["betas"][0], rank, GV=scan.GV, UtG=scan.UtG)
        else:
            U, s, V = lowrank_momentum_update(U, s, V, G, group["betas"][0], rank)
        state["U"], state["s"], state["V"] = U, s, V

        left, right = orthogonalized_factors(U, s, V)
        work = WorkingMatrix(p, p.dtype)
        lowrank_step_(
            work.w, left, right, step_size=group["lr"], decay=1.0 - group["lr"] * group["weight_decay"]
        )
        work.commit()

    def factored_second_moment(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """Always None: MoFaSGD keeps no second moment, so a tracker collects R and C itself."""
        return None


def build(groups: list[dict[str, Any]], hp) -> MoFaSGD:
    """The registry's builder (umtam.optim.registry): ``hp`` is a Hyperparameters."""
    return MoFaSGD(groups, rank=hp.rank, **adam_arguments(hp))
