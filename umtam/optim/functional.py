"""The optimizers' math as pure functions on tensors.

Bookkeeping (state, param groups, dtype casts) lives in the optimizer classes;
everything here takes and returns tensors, so it can be tested on hand-computed
inputs and compared with the dense references in ``tests/optim_reference.py``.

Conventions: a 2-D weight is ``m x n``; ``U`` (m x r) and ``V`` (n x r) have
orthonormal columns, ``s`` (r) holds singular values, so a rank-r momentum is
``U diag(s) V^T``. Functions whose name ends in ``_`` update their first
arguments in place.

References:
    Adafactor (factored second moment): https://arxiv.org/abs/1804.04235
    MoFaSGD (tangent-space momentum update): https://arxiv.org/abs/2507.08091
    Halko, Martinsson, Tropp (randomized SVD): https://arxiv.org/abs/0909.4061
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GradientScan",
    "adam_denominator",
    "adam_moments_update_",
    "adamw_update_",
    "factored_ema_",
    "factored_rms_factors",
    "factored_rsqrt_denominator",
    "factored_second_moment_update",
    "init_factors_from_gradient",
    "lowrank_approx_warm",
    "lowrank_momentum_update",
    "lowrank_step_",
    "reshape_to_matrix",
    "scan_gradient",
    "tangent_residual",
]

# The randomized SVD used to start the factors draws its test matrix from a
# generator local to the call, seeded with this constant: the result depends on
# the gradient only, never on the global RNG, so a run reproduces from its seed
# and a resumed run does not shift the data-loader's random stream.
_INIT_SEED = 0x5EED

# On CPU the m x n passes (G*G, G V, U^T G, the update) run over blocks of rows
# of about 1 MiB: each block stays in cache between its operations, and no
# m x n temporary is allocated (for a 30522 x 384 embedding a fresh 47 MB
# buffer costs more in page faults than the arithmetic). On accelerators one
# block: kernel launches, not cache misses, are what costs there.
_CPU_BLOCK_ELEMENTS = 1 << 18


def _row_blocks(m: int, n: int, device: torch.device) -> list[tuple[int, int]]:
    if device.type != "cpu":
        return [(0, m)]
    rows = max(1, _CPU_BLOCK_ELEMENTS // max(n, 1))
    return [(i, min(i + rows, m)) for i in range(0, m, rows)]


def reshape_to_matrix(t: Tensor) -> Tensor:
    """View a tensor of rank >= 2 as the matrix (shape[0], prod(shape[1:])).

    Conv kernels (out, in, kh, kw) become (out, in*kh*kw), the convention of
    GaLore and Muon. A 2-D tensor is returned as is; lower ranks are an error
    because a matrix factorization of a vector has nothing to factor.
    """
    if t.dim() < 2:
        raise ValueError(f"expected a tensor with at least 2 dimensions, got shape {tuple(t.shape)}")
    if t.dim() == 2:
        return t
    return t.reshape(t.shape[0], -1)


# ----------------------------------------------------------------------------
# Adafactor's rank-1 second moment
# ----------------------------------------------------------------------------


def factored_ema_(R: Tensor, C: Tensor, row_mean_sq: Tensor, col_mean_sq: Tensor, beta2: float) -> None:
    """``R <- beta2 R + (1 - beta2) row_mean_sq``, the same for C, in place."""
    R.lerp_(row_mean_sq, 1.0 - beta2)
    C.lerp_(col_mean_sq, 1.0 - beta2)


def factored_second_moment_update(R: Tensor, C: Tensor, grad_sq: Tensor, beta2: float) -> None:
    """EMA of the row means (R, length m) and column means (C, length n) of G*G, in place.

    ``R <- beta2 R + (1 - beta2) mean_j G_ij^2`` and
    ``C <- beta2 C + (1 - beta2) mean_i G_ij^2`` (Adafactor, Algorithm 4).
    Means rather than sums keep R and C on the scale of one entry of G*G, the
    same as Adafactor's ``exp_avg_sq_row`` / ``exp_avg_sq_col``. The
    optimizers get the means from ``scan_gradient`` instead, which never
    forms G*G as a whole.
    """
    factored_ema_(R, C, grad_sq.mean(dim=1), grad_sq.mean(dim=0), beta2)


class GradientScan(NamedTuple):
    """What one pass over a gradient G (m x n) collects."""

    row_mean_sq: Tensor  # (m,) mean_j G_ij^2
    col_mean_sq: Tensor  # (n,) mean_i G_ij^2
    GV: Tensor | None  # (m, r) G V, when V was given
    UtG: Tensor | None  # (r, n) U^T G, when U was given


def scan_gradient(G: Tensor, U: Tensor | None = None, V: Tensor | None = None) -> GradientScan:
    """Row and column means of G*G, and optionally G V and U^T G, in one blocked pass over G.

    Everything the low-rank optimizers read from G, so G is streamed through
    the cache once and no m x n temporary is formed. The tracker calls it
    too, so its statistics and UMTAM's agree bit for bit.
    """
    m, n = G.shape
    row = torch.empty(m, dtype=G.dtype, device=G.device)
    col = torch.zeros(n, dtype=G.dtype, device=G.device)
    GV = None if V is None else torch.empty(m, V.shape[1], dtype=G.dtype, device=G.device)
    UtG = None if U is None else torch.zeros(U.shape[1], n, dtype=G.dtype, device=G.device)
    blocks = _row_blocks(m, n, G.device)
    scratch = torch.empty(blocks[0][1] - blocks[0][0], n, dtype=G.dtype, device=G.device)
    for i, j in blocks:
        Gb = G[i:j]
        sq = torch.mul(Gb, Gb, out=scratch[: j - i])
        torch.mean(sq, dim=1, out=row[i:j])
        col.add_(sq.sum(dim=0))
        if GV is not None:
            torch.mm(Gb, V, out=GV[i:j])
        if UtG is not None:
            UtG.addmm_(U[i:j].T, Gb)
    return GradientScan(row, col.div_(max(m, 1)), GV, UtG)


def factored_rms_factors(R_hat: Tensor, C_hat: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors (a, b) with ``outer(a, b) = sqrt(R_hat C_hat^T / mean(R_hat))``.

    ``R C^T / mean(R)`` is Adafactor's rank-1 estimate of the entrywise second
    moment (it matches the true row and column sums); its square root splits
    over the two factors. Before any gradient (all R zero) it is 0, not 0/0.
    """
    mean_r = R_hat.mean().clamp_min(torch.finfo(R_hat.dtype).tiny)
    return R_hat.sqrt(), (C_hat / mean_r).sqrt()


def factored_rsqrt_denominator(R_hat: Tensor, C_hat: Tensor, eps: float) -> Tensor:
    """Dense ``sqrt(R_hat C_hat^T / mean(R_hat)) + eps``, the Adam denominator of a factored moment.

    Pass bias-corrected R and C. ``lowrank_step_`` forms the same values block
    by block instead of as one m x n tensor.
    """
    a, b = factored_rms_factors(R_hat, C_hat)
    return torch.addr(torch.tensor(eps, dtype=a.dtype, device=a.device), a, b)


def lowrank_step_(
    W: Tensor,
    left: Tensor,
    right: Tensor,
    *,
    step_size: float,
    decay: float = 1.0,
    rms: tuple[Tensor, Tensor] | None = None,
    eps: float = 0.0,
) -> None:
    """``W <- decay W - step_size (left right^T) [/ (outer(a, b) + eps)]`` in place, row block by row block.

    ``left`` (m x k) and ``right`` (n x k) factor the step's numerator;
    ``rms = (a, b)`` from ``factored_rms_factors`` divides it entrywise by the
    factored RMS (UMTAM), ``rms=None`` leaves the low-rank step as is (MoFaSGD,
    GaLore). ``decay = 1 - lr wd`` is decoupled weight decay. The arithmetic
    runs in ``left``'s dtype; a W of lower precision (bf16) is cast per block
    and rounded once, so no fp32 copy of W is made. Only block-sized
    temporaries: the m x n step is never materialised.
    """
    m, n = W.shape
    dtype = left.dtype
    blocks = _row_blocks(m, n, W.device)
    rows = blocks[0][1] - blocks[0][0]
    numer = torch.empty(rows, n, dtype=dtype, device=W.device) if rms is not None else None
    denom = torch.empty(rows, n, dtype=dtype, device=W.device) if rms is not None else None
    eps_t = torch.tensor(eps, dtype=dtype, device=W.device)
    for i, j in blocks:
        Wb = W[i:j]
        work = Wb if Wb.dtype == dtype else Wb.to(dtype)
        if decay != 1.0:
            work.mul_(decay)
        if rms is None:
            work.addmm_(left[i:j], right.T, alpha=-step_size)
        else:
            step = torch.mm(left[i:j], right.T, out=numer[: j - i])
            den = torch.addr(eps_t, rms[0][i:j], rms[1], out=denom[: j - i])
            work.addcdiv_(step, den, value=-step_size)
        if work is not Wb:
            Wb.copy_(work)


# ----------------------------------------------------------------------------
# Low-rank momentum (MoFaSGD's tangent-space update)
# ----------------------------------------------------------------------------


def init_factors_from_gradient(
    G: Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r SVD ``(U, s, V)`` of a first gradient, so the tangent space is not empty.

    From all-zero factors ``P_T(G) = 0`` and the momentum would never move, so
    the factors start from the top-r singular subspaces of G. Small matrices
    (min(m, n) at most twice the sketch size) get an exact
    ``torch.linalg.svd``; larger ones a randomized SVD (Halko et al.,
    Algorithm 4.4: a Gaussian sketch of ``rank + oversample`` columns and
    ``power_iters`` QR-stabilised power iterations). The sketch is drawn from a
    generator local to this call with a fixed seed, so the result is a
    deterministic function of G and the global RNG is left untouched.
    """
    m, n = G.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}x{n} matrix, got {rank}")
    k = min(rank + oversample, m, n)
    if 2 * k >= min(m, n):
        U, s, Vh = torch.linalg.svd(G, full_matrices=False)
        return U[:, :rank].contiguous(), s[:rank].contiguous(), Vh[:rank].T.contiguous()
    gen = torch.Generator(device=G.device)
    gen.manual_seed(_INIT_SEED)
    omega = torch.randn(n, k, generator=gen, dtype=G.dtype, device=G.device)
    Q = torch.linalg.qr(G @ omega).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(G.T @ Q).Q
        Q = torch.linalg.qr(G @ Q).Q
    Ub, s, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
    return (Q @ Ub[:, :rank]), s[:rank].contiguous(), Vh[:rank].T.contiguous()


def _truncate_core(Qa: Tensor, core: Tensor, Qb: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-r factors of ``Qa core Qb^T`` given orthonormal Qa, Qb: an SVD of the small core."""
    Uc, sc, Vch = torch.linalg.svd(core, full_matrices=False)
    return Qa @ Uc[:, :rank], sc[:rank].contiguous(), Qb @ Vch[:rank].T


def lowrank_momentum_update(
    U: Tensor,
    s: Tensor,
    V: Tensor,
    G: Tensor | None,
    beta1: float,
    rank: int,
    *,
    GV: Tensor | None = None,
    UtG: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-r factors of ``beta1 U diag(s) V^T + (1 - beta1) P_T(G)`` (MoFaSGD's update).

    ``P_T(G) = U U^T G + G V V^T - U U^T G V V^T`` projects G on the tangent
    space of rank-r matrices at (U, V). The new momentum M~ then has its
    columns in span[U, G V] and its rows in span[V, G^T U]. With thin QRs
    ``[U, GV] = Qa Ra`` and ``[V, G^T U] = Qb Rb`` (blocks ``Ra = [Ra1 Ra2]``,
    ``Rb = [Rb1 Rb2]``), ``M~ = Qa K Qb^T`` with the (at most 2r x 2r) core

        K = beta1 Ra1 diag(s) Rb1^T
            + (1 - beta1) (Ra1 Rb2^T + Ra2 Rb1^T - Ra1 (U^T G V) Rb1^T)

    because ``Qa^T U = Ra1``, ``Qa^T GV = Ra2``, ``Qb^T V = Rb1`` and
    ``U^T G Qb = Rb2^T``. An SVD of K gives M~'s best rank-r factors. Cost:
    the two products G V and U^T G (O(mnr)), QRs of m x 2r and n x 2r and an
    SVD of 2r x 2r (O((m + n) r^2)); no m x n matrix is formed. The QR of the
    whole block (rather than Gram-Schmidt against U) keeps Qa orthonormal
    to working precision even when G V lies almost inside span(U).

    ``GV`` and ``UtG`` may be passed precomputed (``scan_gradient`` gets them
    in the same pass as the second moment); G is then not read. ``rank`` may
    differ from U's column count (the caller clamps it to min(m, n)); the
    returned factors are new tensors.
    """
    r_old = U.shape[1]
    if GV is None:
        GV = G @ V
    if UtG is None:
        UtG = U.T @ G
    UtGV = UtG @ V
    Qa, Ra = torch.linalg.qr(torch.cat([U, GV], dim=1))
    Qb, Rb = torch.linalg.qr(torch.cat([V, UtG.T], dim=1))
    Ra1, Ra2 = Ra[:, :r_old], Ra[:, r_old:]
    Rb1, Rb2 = Rb[:, :r_old], Rb[:, r_old:]
    inner = torch.diag(s) * beta1 - UtGV * (1.0 - beta1)
    core = Ra1 @ inner @ Rb1.T + (Ra1 @ Rb2.T + Ra2 @ Rb1.T) * (1.0 - beta1)
    if rank > min(core.shape):
        raise ValueError(f"rank {rank} exceeds the {min(core.shape)} directions of the tangent space")
    return _truncate_core(Qa, core, Qb, rank)


def tangent_residual(G: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """The part of G outside the tangent space at (U, V): ``G - P_T(G) = (I - UU^T) G (I - VV^T)``.

    This is what the tangent-space momentum update drops each step (times
    1 - beta1). Dense (m x n), so for diagnostics and tests only: the
    error-feedback path keeps the whole truncation residual of its dense M~
    in E, which includes this part.
    """
    left = G - U @ (U.T @ G)
    return left - (left @ V) @ V.T


def lowrank_approx_warm(
    M: Tensor, U: Tensor, V: Tensor, rank: int, *, power_iters: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-r SVD of a dense M by subspace iteration warm-started at the previous factors.

    Used when a dense momentum exists (error feedback). The row-space block
    starts as ``[V, M^T U]`` (2r columns: the previous momentum's subspaces and
    where M maps them), then ``power_iters`` rounds of ``Qa = qr(M Qb)``,
    ``Qb, Rb = qr(M^T Qa)``; since ``Qa^T M Qb = Rb^T``, an SVD of that 2r x 2r
    core gives the factors. Exact when 2r >= min(m, n); otherwise accurate to
    the usual subspace-iteration rate, which the warm start makes fast because
    the momentum's subspaces move slowly. Deterministic (no random sketch).
    Cost O(mnr) per round.
    """
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    Qb = torch.linalg.qr(torch.cat([V, M.T @ U], dim=1)).Q
    for _ in range(power_iters):
        Qa = torch.linalg.qr(M @ Qb).Q
        Qb, Rb = torch.linalg.qr(M.T @ Qa)
    if rank > min(Rb.shape):
        raise ValueError(f"rank {rank} exceeds the {min(Rb.shape)} directions of the sketch")
    return _truncate_core(Qa, Rb.T, Qb, rank)


# ----------------------------------------------------------------------------
# Adam (for 1-D parameters and projected gradients)
# ----------------------------------------------------------------------------


def adam_moments_update_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float) -> None:
    """Adam's EMAs of G and G*G, in place (the same ops as ``torch.optim.Adam``)."""
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def adam_denominator(exp_avg_sq: Tensor, step: float, beta2: float, eps: float) -> Tensor:
    """``sqrt(v / (1 - beta2^t)) + eps``: eps added after bias correction, as torch.optim.AdamW."""
    bias_correction2 = 1.0 - beta2**step
    return (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)


def adamw_update_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101).

    Bias-corrected moments, decoupled weight decay ``W <- W (1 - lr wd)``, the
    operation order of ``torch.optim.AdamW(foreach=False)``. ``step`` is the
    1-based count after this step's increment.
    """
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    adam_moments_update_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    denom = adam_denominator(exp_avg_sq, step, beta2, eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))
