"""Bookkeeping shared by umtam's optimizers: hyperparameter checks, fp32 state, AdamW for vectors.

No math lives here beyond calling ``functional``; the classes in ``umtam.py``,
``mofasgd.py`` and ``galore.py`` differ only in what they do with a 2-D weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from math import prod
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from umtam.optim.functional import adamw_update_, reshape_to_matrix


def state_dtype(p: Tensor) -> torch.dtype:
    """fp64 for fp64 parameters (exact tests), fp32 for everything else (bf16/fp16 included).

    Low-precision state would lose the small EMA increments ((1 - beta2) G^2
    underflows bf16's 8-bit mantissa against R) and break resume bit for bit.
    """
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def check_common_hparams(lr: float, betas: Iterable[float], eps: float, weight_decay: float) -> tuple[float, float]:
    """The checks of ``torch.optim.Adam.__init__``; returns betas as a tuple."""
    if not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    betas = tuple(betas)
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected two values)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    return betas  # type: ignore[return-value]


def check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} (must be an integer >= 1)")
    return rank


def clamped_rank(requested: int, shape: Iterable[int]) -> int:
    """The rank used for a weight of ``shape`` read as m x n = (shape[0], rest): ``requested``, at most min(m, n).

    An m x n matrix has no more than min(m, n) independent directions, so a
    larger rank is clamped per matrix (rank 8 on a 2 x 384 token-type
    embedding uses 2); ``umtam.optim.effective_ranks`` reports which were.
    """
    m, *rest = shape
    return min(requested, m, prod(rest))


class WorkingMatrix:
    """A parameter seen as an (m, n) matrix of ``dtype`` (vectors keep their shape), written back on ``commit``.

    A contiguous parameter already of ``dtype`` is updated in place through a
    view; otherwise through a copy (e.g. fp32 for a bf16 vector under AdamW,
    so the math runs in fp32 and the parameter is rounded once). The low-rank
    steps pass ``p.dtype`` and let ``functional.lowrank_step_`` cast block by
    block, so they never copy a whole contiguous matrix.
    """

    def __init__(self, p: Tensor, dtype: torch.dtype):
        self._p = p
        if p.dtype == dtype and p.is_contiguous():
            self.w = p.view(p.shape[0], -1) if p.dim() >= 2 else p
            self._copy = False
        else:
            base = reshape_to_matrix(p) if p.dim() >= 2 else p
            self.w = base.to(dtype=dtype, copy=True)
            self._copy = True

    def commit(self) -> None:
        if self._copy:
            self._p.copy_(self.w.view(self._p.shape))


def grad_matrix(p: Tensor, dtype: torch.dtype) -> Tensor:
    """p.grad as an (m, n) matrix in ``dtype`` (a view when no cast is needed; never modified)."""
    grad = p.grad
    if grad.is_sparse:
        raise RuntimeError("umtam optimizers do not support sparse gradients; use a dense embedding")
    return reshape_to_matrix(grad).to(dtype)


class FP32StateOptimizer(Optimizer):
    """An Optimizer whose state stays fp32 for low-precision parameters, also across load_state_dict.

    ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor
    but ``step`` to the parameter's dtype, which would round fp32 moments of a
    bf16 weight to bf16 on resume. This class re-reads them from the given
    state dict in their state dtype, and copies ``step`` (torch shares it with
    the source dict, so two optimizers loaded from one dict would step it twice).
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            self.state[p] = {
                key: _restore(value, p, key) if isinstance(value, Tensor) else value for key, value in saved.items()
            }

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step: the subclass's matrix update where it applies, AdamW elsewhere."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if self._uses_matrix_step(p, group):
                    self._matrix_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _uses_matrix_step(self, p: Tensor, group: dict[str, Any]) -> bool:
        return p.dim() >= 2

    def rank_used(self, p: Tensor, group: dict[str, Any]) -> int | None:
        """The rank the matrix step uses for ``p`` (``clamped_rank``), or None where it takes no rank (AdamW)."""
        if "rank" not in group or not self._uses_matrix_step(p, group):
            return None
        return clamped_rank(group["rank"], p.shape)

    def _matrix_step(self, p: Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _adamw_step(self, p: Tensor, group: dict[str, Any]) -> None:
        """AdamW for vectors (and matrices a group keeps dense), in fp32."""
        state = self.state[p]
        dtype = state_dtype(p)
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        if p.grad.is_sparse:
            raise RuntimeError("umtam optimizers do not support sparse gradients; use a dense embedding")
        state["step"] += 1
        beta1, beta2 = group["betas"]
        work = WorkingMatrix(p, dtype) if p.dtype != dtype else None
        target = work.w.view(p.shape) if work is not None else p
        adamw_update_(
            target,
            p.grad.to(dtype),
            state["exp_avg"],
            state["exp_avg_sq"],
            state["step"].item(),
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        if work is not None:
            work.commit()


def _restore(value: Tensor, p: Tensor, key: str) -> Tensor:
    if key == "step" or not value.is_floating_point():
        return value.to(device="cpu" if key == "step" else p.device, copy=True)
    return value.to(device=p.device, dtype=state_dtype(p), copy=True)


def adam_arguments(hp) -> dict[str, Any]:
    """lr, betas, weight decay (and eps when given) of a registry Hyperparameters, as Adam takes them."""
    arguments: dict[str, Any] = {"lr": hp.lr, "betas": tuple(hp.betas), "weight_decay": hp.weight_decay}
    if hp.eps is not None:
        arguments["eps"] = hp.eps
    return arguments
