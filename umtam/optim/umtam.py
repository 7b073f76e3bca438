"""UMTAM: low-rank momentum with a factorized second moment (DESIGN.md section 3).

Paper: "Bridging Training and Merging Through Momentum-Aware Optimization",
https://arxiv.org/abs/2512.17109. Low-rank momentum update from MoFaSGD,
https://arxiv.org/abs/2507.08091; second moment from Adafactor,
https://arxiv.org/abs/1804.04235.
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
    factored_ema_,
    factored_rms_factors,
    init_factors_from_gradient,
    lowrank_approx_warm,
    lowrank_momentum_update,
    lowrank_step_,
    scan_gradient,
)

# Subspace-iteration rounds for the rank-r SVD of the dense momentum under
# error feedback. Warm-started at the previous factors, two rounds stay within
# 1% of the best rank-r error on the low-rank-plus-noise problem of the tests;
# whatever the truncation misses is kept in E, not lost.
_EF_POWER_ITERS = 2


def lowrank_adam_factors(
    U: Tensor, s: Tensor, V: Tensor, R: Tensor, C: Tensor, step: float, beta1: float, beta2: float
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Factors of UMTAM's step ``D = (U s V^T / bc1) / (sqrt(Vhat / bc2) + eps)`` for ``lowrank_step_``.

    Returns (left, right, rms) with ``left right^T = U diag(s) V^T / (1 - b1^t)``
    and ``outer(*rms) = sqrt(R_hat C_hat^T / mean(R_hat))``. Rows (columns)
    whose second moment is exactly zero never had a nonzero gradient, so the
    momentum there is zero in exact arithmetic; the factors carry rounding
    noise of order 1e-7 |M| that ``eps`` alone would amplify by 1/eps. Those
    rows and columns are zeroed, so e.g. the embedding rows of tokens the task
    never sees stay exactly at the base weights.
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    R_hat, C_hat = R / bias_correction2, C / bias_correction2
    left = torch.where((R_hat > 0).unsqueeze(1), U * (s / bias_correction1), 0.0)
    right = torch.where((C_hat > 0).unsqueeze(1), V, 0.0)
    return left, right, factored_rms_factors(R_hat, C_hat)


class UMTAM(FP32StateOptimizer):
    r"""Low-rank momentum, factorized second moment, decoupled weight decay.

    For every parameter of rank >= 2 (viewed as m x n = (shape[0], rest)) in a
    group with ``lowrank=True``, with rank r clamped to min(m, n)::

        R <- b2 R + (1-b2) mean_j G^2,   C <- b2 C + (1-b2) mean_i G^2
        M~ = b1 U diag(s) V^T + (1-b1) P_T(G)          (tangent-space projection)
        (U, s, V) <- best rank-r factors of M~          (two thin QRs + 2r x 2r SVD)
        D = (U diag(s) V^T / (1-b1^t)) / (sqrt(R C^T / mean(R) / (1-b2^t)) + eps)
        W <- W - lr (D + wd W)

    State per matrix: U (m x r), s (r), V (n x r), R (m), C (n) and ``step``:
    (m + n)(r + 1) + r floats, against AdamW's 2mn. The factors start from a
    deterministic rank-r SVD of the first gradient with s = 0, so step 1 gives
    M_1 = (1-b1) P_T(G_1), the rank-r truncation of (1-b1) G_1.

    With ``error_feedback=True`` a dense buffer E (m x n) keeps what the
    truncation drops: ``M~ = b1 U diag(s) V^T + (1-b1) G + g E`` (g =
    ``error_feedback_scale``), its rank-r factors come from a subspace
    iteration warm-started at (U, V), and ``E <- M~ - U diag(s) V^T``. This
    costs mn more floats and O(mnr) more work per step, still far below the
    paper's dense E, S and W0 buffers.

    Parameters of rank < 2, and all parameters of a group with
    ``lowrank=False``, get AdamW (bias-corrected, decoupled weight decay).

    Embeddings get the low-rank treatment by default: a batch touches a few
    hundred of the vocabulary rows, so their gradient is sparse and low-rank,
    and a dense AdamW state for a 30522 x 384 word embedding (23.4M floats) is
    the largest single optimizer state in a MiniLM/BERT; skipping it would
    forfeit most of the memory saving. Put a parameter in a group with
    ``lowrank=False`` to give it dense AdamW instead::

        UMTAM([{"params": body}, {"params": [emb.weight], "lowrank": False}], lr=2e-4)

    All math runs in fp32 (fp64 for fp64 parameters); bf16 parameters keep
    fp32 state and receive the update cast back once. State holds tensors
    only, so ``state_dict()`` round-trips through safetensors and a resumed run
    continues bit for bit.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate. 2e-4 reached AdamW-at-5e-5 dev scores on MRPC at rank 8.
        betas: (b1, b2), EMA rates of the momentum and of the second moment.
        eps: added to the factored RMS denominator. 1e-8 as torch's and the HF
            Trainer's AdamW, so learning rates compare with the AdamW baseline;
            the denominator is O(RMS of G) (>= 1e-7 for any entry that ever
            got a gradient in fp32 training), so eps only matters where the
            second moment vanishes, and there the update is zeroed exactly.
        weight_decay: decoupled (AdamW-style) weight decay.
        rank: momentum rank r (clamped to min(m, n) per matrix).
        error_feedback: keep a dense residual buffer E (see above).
        error_feedback_scale: g, the weight of E in the next momentum.
        lowrank: low-rank treatment for matrices of this group.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rank: int = 8,
        error_feedback: bool = False,
        error_feedback_scale: float = 1.0,
        lowrank: bool = True,
    ):
        betas = check_common_hparams(lr, betas, eps, weight_decay)
        rank = check_rank(rank)
        if not error_feedback_scale >= 0.0:
            raise ValueError(f"Invalid error_feedback_scale: {error_feedback_scale} (must be >= 0)")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            error_feedback=bool(error_feedback),
            error_feedback_scale=error_feedback_scale,
            lowrank=bool(lowrank),
        )
        super().__init__(params, defaults)

    def _uses_matrix_step(self, p: Tensor, group: dict[str, Any]) -> bool:
        return group["lowrank"] and p.dim() >= 2

    def _matrix_step(self, p: Tensor, group: dict[str, Any]) -> None:
        dtype = state_dtype(p)
        G = grad_matrix(p, dtype)
        m, n = G.shape
        rank = clamped_rank(group["rank"], G.shape)
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            U, _, V = init_factors_from_gradient(G, rank)
            # s = 0: the momentum before the first step is zero; (U, V) only
            # open the tangent space that the first gradient is projected on.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["U"], state["s"], state["V"] = U, torch.zeros(rank, dtype=dtype, device=G.device), V
            state["R"] = torch.zeros(m, dtype=dtype, device=G.device)
            state["C"] = torch.zeros(n, dtype=dtype, device=G.device)
        if group["error_feedback"] and "E" not in state:
            state["E"] = torch.zeros_like(G)

        state["step"] += 1
        step = state["step"].item()
        U, s, V = state["U"], state["s"], state["V"]
        ef = group["error_feedback"]
        # one pass over G for the second moment and, on the fast path, G V and U^T G
        scan = scan_gradient(G) if ef else scan_gradient(G, U, V)
        factored_ema_(state["R"], state["C"], scan.row_mean_sq, scan.col_mean_sq, beta2)

        if ef:
            # E becomes M~ in place, then the residual, so no second m x n buffer.
            E = state["E"]
            E.mul_(group["error_feedback_scale"]).add_(G, alpha=1.0 - beta1).addmm_(U * (s * beta1), V.T)
            U, s, V = lowrank_approx_warm(E, U, V, rank, power_iters=_EF_POWER_ITERS)
            E.addmm_(U * s, V.T, alpha=-1.0)
        else:
            U, s, V = lowrank_momentum_update(U, s, V, None, beta1, rank, GV=scan.GV, UtG=scan.UtG)
        state["U"], state["s"], state["V"] = U, s, V

        left, right, rms = lowrank_adam_factors(U, s, V, state["R"], state["C"], step, beta1, beta2)
        work = WorkingMatrix(p, p.dtype)
        lowrank_step_(
            work.w,
            left,
            right,
            step_size=group["lr"],
            decay=1.0 - group["lr"] * group["weight_decay"],
            rms=rms,
            eps=group["eps"],
        )
        work.commit()

    def factored_second_moment(self, p: Tensor) -> tuple[Tensor, Tensor] | None:
        """Bias-corrected (R, C) of ``p`` if this optimizer tracks them, else None.

        R (length m) and C (length n) are the EMAs of the row and column means
        of G*G with ``betas[1]``, as ``CurvatureTracker`` would collect them, so
        a tracker can read them instead of tracking twice. Zeros before the
        first step of ``p``; None for vectors and ``lowrank=False`` groups.
        Returns new tensors (the state is not exposed).
        """
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                break
        else:
            return None
        if not self._uses_matrix_step(p, group):
            return None
        state = self.state.get(p)
        if not state:
            m = p.shape[0]
            n = p.numel() // m if m else 0
            dtype = state_dtype(p)
            return torch.zeros(m, dtype=dtype, device=p.device), torch.zeros(n, dtype=dtype, device=p.device)
        bias_correction2 = 1.0 - group["betas"][1] ** state["step"].item()
        return state["R"] / bias_correction2, state["C"] / bias_correction2


def build(groups: list[dict[str, Any]], hp) -> UMTAM:
    """The registry's builder (umtam.optim.registry): ``hp`` is a Hyperparameters."""
    return UMTAM(groups, rank=hp.rank, error_feedback=hp.error_feedback, **adam_arguments(hp))
