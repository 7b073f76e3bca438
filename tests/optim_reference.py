"""Slow, obviously-correct dense references for umtam's optimizers (one matrix, formulas as in the papers).

Everything is formed densely and truncated with ``torch.linalg.svd`` of the
full matrix: the fast paths in ``umtam.optim`` must agree with these step by
step. Use fp64 inputs for tight comparisons.
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :rank], s[:rank], Vh[:rank].T


class DenseUMTAM:
    """UMTAM on one m x n weight, dense (DESIGN.md section 3)."""

    def __init__(self, W, *, lr, betas, eps, weight_decay, rank, error_feedback=False, error_feedback_scale=1.0):
        self.W = W.clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        m, n = W.shape
        self.rank = min(rank, m, n)
        self.ef, self.g = error_feedback, error_feedback_scale
        self.t = 0
        self.R = torch.zeros(m, dtype=W.dtype)
        self.C = torch.zeros(n, dtype=W.dtype)
        self.M = torch.zeros_like(W)  # the low-rank momentum U diag(s) V^T, stored densely
        self.E = torch.zeros_like(W)
        self.U = self.V = None

    def tangent_projection(self, G):
        PU = self.U @ self.U.T
        PV = self.V @ self.V.T
        return PU @ G + G @ PV - PU @ G @ PV

    def step(self, G):
        self.t += 1
        self.R = self.b2 * self.R + (1 - self.b2) * (G * G).mean(dim=1)
        self.C = self.b2 * self.C + (1 - self.b2) * (G * G).mean(dim=0)
        if self.U is None:
            self.U, _, self.V = truncated_svd(G, self.rank)
        if self.ef:
            M_tilde = self.b1 * self.M + (1 - self.b1) * G + self.g * self.E
        else:
            M_tilde = self.b1 * self.M + (1 - self.b1) * self.tangent_projection(G)
        self.U, s, self.V = truncated_svd(M_tilde, self.rank)
        self.M = self.U @ torch.diag(s) @ self.V.T
        if self.ef:
            self.E = M_tilde - self.M
        R_hat = self.R / (1 - self.b2**self.t)
        C_hat = self.C / (1 - self.b2**self.t)
        V_hat = torch.outer(R_hat, C_hat) / R_hat.mean()
        D = (self.M / (1 - self.b1**self.t)) / (V_hat.sqrt() + self.eps)
        D[R_hat == 0, :] = 0
        D[:, C_hat == 0] = 0
        self.W = self.W - self.lr * (D + self.wd * self.W)
        return M_tilde


class DenseGaLoreAdamW:
    """GaLore-AdamW on one m x n weight (arXiv 2403.03507, Algorithm 2, proj_type "std")."""

    def __init__(self, W, *, lr, betas, eps, weight_decay, rank, update_proj_gap, scale):
        self.W = W.clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank, self.gap, self.scale = min(rank, *W.shape), update_proj_gap, scale
        self.t = 0
        self.P = None
        self.m = self.v = None

    def step(self, G):
        m, n = G.shape
        if self.t % self.gap == 0:
            U, _, V = truncated_svd(G, self.rank)
            # the smaller side is projected: a dense projector matrix on that side
            self.P = V if m >= n else U
        self.t += 1
        low = G @ self.P if m >= n else self.P.T @ G
        if self.m is None:
            self.m, self.v = torch.zeros_like(low), torch.zeros_like(low)
        self.m = self.b1 * self.m + (1 - self.b1) * low
        self.v = self.b2 * self.v + (1 - self.b2) * low * low
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        N = m_hat / (v_hat.sqrt() + self.eps)
        full = N @ self.P.T if m >= n else self.P @ N
        self.W = self.W - self.lr * (self.scale * full + self.wd * self.W)
