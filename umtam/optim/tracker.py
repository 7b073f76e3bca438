"""Curvature statistics for any optimizer: factored EMA of G*G, O(m + n) per matrix.

Every trained checkpoint carries the same statistics whatever its optimizer
(DESIGN.md section 3), so that pruning and merging read them instead of
recomputing Fisher information, and comparisons between optimizers are fair.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from umtam.optim.functional import factored_ema_, reshape_to_matrix, scan_gradient

ROW, COL, FULL = "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"
# Opt-in dense statistics (4 bytes per entry each; the trajectory also keeps W0, 4 more):
FISHER = "fisher"  # EMA of G*G per entry: the full Fisher diagonal (empirical), for --score fisher
TRAJECTORY = "trajectory"  # EMA of (T_t * G_t)^2, T_t = W_t - W0: the trajectory-accumulated saliency
INITIAL = "initial"  # W0, kept for T_t; resume state, never exported
DENSE_KINDS = (FISHER, TRAJECTORY)


def _group_beta2(optimizer: torch.optim.Optimizer, p: Tensor) -> float | None:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            betas = group.get("betas")
            return None if betas is None else float(betas[1])
    return None


class CurvatureTracker:
    """EMA of the second moment of the gradients, factored for matrices (Adafactor's statistics).

    For each parameter of rank >= 2 (viewed as (shape[0], rest)): the EMAs of
    the row means (length m) and column means (length n) of G*G; for vectors
    (and scalars): the EMA of G*G. All with rate ``beta2`` and bias-corrected
    in ``stats()``, keyed with Adafactor's state names so other tools
    recognise them: ``exp_avg_sq_row/<name>``, ``exp_avg_sq_col/<name>``,
    ``exp_avg_sq/<name>``. (HF's Adafactor factors higher-rank tensors over
    their last two dimensions instead; umtam uses (shape[0], rest) everywhere.)

    When ``optimizer`` has ``factored_second_moment(p)`` and it returns
    non-None for a parameter (UMTAM's low-rank matrices), the tracker reads
    the optimizer's R and C instead of keeping its own copy, provided the
    optimizer's ``betas[1]`` for that parameter equals ``beta2`` (otherwise
    the two EMAs would differ and the tracker keeps its own). Only parameters
    with ``requires_grad`` are tracked.

    Call ``update()`` once per optimizer step, after the backward (and after
    gradient accumulation / all-reduce), before ``zero_grad``. A parameter
    whose ``.grad`` is None is skipped for that step, as optimizers do; one
    that never got a gradient reports zeros.

    ``dense`` opts in to per-entry statistics of every tracked parameter
    (DENSE_KINDS, DESIGN section 4's alternatives): ``fisher`` (EMA of G*G,
    exported as ``fisher/<name>``) and ``trajectory`` (EMA of (T_t * G_t)^2
    with T_t = W_t - W0 taken before each step, exported as
    ``trajectory/<name>``: the squared first-order Taylor term of removing the
    task vector, accumulated over training; with T moving slowly against the
    EMA's horizon it is the EMA of T_t^2 v_t). Both at rate ``beta2`` and
    bias-corrected; the trajectory keeps a float32 copy of W0 to form T_t.
    They cost 4 (fisher) and 8 (trajectory) bytes per entry, AdamW's state
    size for both: opt-in, for the saliency study.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, Parameter]],
        beta2: float = 0.999,
        optimizer: torch.optim.Optimizer | None = None,
        dense: Iterable[str] = (),
    ):
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {beta2} (must be in [0, 1))")
        self.beta2 = float(beta2)
        self.dense = tuple(kind for kind in DENSE_KINDS if kind in set(dense))
        unknown = sorted(set(dense) - set(DENSE_KINDS))
        if unknown:
            raise ValueError(f"unknown dense statistics {unknown}; choose from {', '.join(DENSE_KINDS)}")
        self._optimizer = optimizer
        self._own: dict[str, Parameter] = {}
        self._reused: dict[str, Parameter] = {}
        self._state: dict[str, dict[str, Tensor]] = {}
        reader = getattr(optimizer, "factored_second_moment", None)
        for name, p in named_parameters:
            if not p.requires_grad:
                continue
            if name in self._own or name in self._reused:
                raise ValueError(f"duplicate parameter name {name!r}")
            reused = reader is not None and reader(p) is not None and _group_beta2(optimizer, p) == self.beta2
            (self._reused if reused else self._own)[name] = p
            state = {} if reused else self._init_state(p)
            state.update(self._init_dense(p))
            if state:
                self._state[name] = {"step": torch.tensor(0.0, dtype=torch.float32), **state}

    @staticmethod
    def _init_state(p: Tensor) -> dict[str, Tensor]:
        if p.dim() >= 2:
            m = p.shape[0]
            return {ROW: torch.zeros(m, dtype=torch.float32, device=p.device),
                    COL: torch.zeros(p.numel() // m, dtype=torch.float32, device=p.device)}
        return {FULL: torch.zeros_like(p, dtype=torch.float32)}

    def _init_dense(self, p: Tensor) -> dict[str, Tensor]:
        state = {kind: torch.zeros_like(p, dtype=torch.float32) for kind in self.dense}
        if TRAJECTORY in self.dense:
            state[INITIAL] = p.detach().to(torch.float32).clone()
        return state

    @property
    def reused_names(self) -> tuple[str, ...]:
        """Names whose statistics are read from the optimizer."""
        return tuple(self._reused)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients into the EMAs (factored ones the optimizer keeps are read, not folded).

        Call before the optimizer step: the trajectory's T_t is the task vector
        the gradient was taken at.
        """
        for name, state in self._state.items():
            p = self._own.get(name, self._reused.get(name))
            if p.grad is None:
                continue
            state["step"] += 1
            if ROW in state:
                # the same blocked pass as UMTAM's, so reused and own statistics agree bit for bit
                scan = scan_gradient(reshape_to_matrix(p.grad).float())
                factored_ema_(state[ROW], state[COL], scan.row_mean_sq, scan.col_mean_sq, self.beta2)
            g = p.grad.float()
            if FULL in state:
                state[FULL].mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            if FISHER in state:
                state[FISHER].mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            if TRAJECTORY in state:
                taylor = (p.detach().float() - state[INITIAL]).mul_(g)
                state[TRAJECTORY].mul_(self.beta2).addcmul_(taylor, taylor, value=1.0 - self.beta2)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """Bias-corrected statistics as contiguous fp32 CPU tensors, keyed ``<stat>/<name>``."""
        out: dict[str, Tensor] = {}
        for name, p in self._reused.items():
            R, C = self._optimizer.factored_second_moment(p)  # type: ignore[union-attr]
            out[f"{ROW}/{name}"] = _export(R)
            out[f"{COL}/{name}"] = _export(C)
        for name, state in self._state.items():
            step = state["step"].item()
            correction = 1.0 - self.beta2**step if step > 0 else 1.0
            for key, value in state.items():
                if key not in ("step", INITIAL):
                    out[f"{key}/{name}"] = _export(value / correction)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"beta2": float, "state": {name: {"step": T, <stat>: T}}}``: tensors and numbers only."""
        return {
            "beta2": self.beta2,
            "state": {name: {k: v.detach().clone() for k, v in st.items()} for name, st in self._state.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; the tracked names and shapes must match."""
        saved = state_dict["state"]
        if float(state_dict["beta2"]) != self.beta2:
            raise ValueError(f"tracker state has beta2={state_dict['beta2']}, this tracker uses {self.beta2}")
        missing = sorted(set(self._state) - set(saved))
        unexpected = sorted(set(saved) - set(self._state))
        if missing or unexpected:
            raise ValueError(f"tracker state does not match the parameters: missing {missing}, unexpected {unexpected}")
        for name, state in self._state.items():
            if set(saved[name]) != set(state):
                raise ValueError(f"tracker state for {name!r} has keys {sorted(saved[name])}, expected {sorted(state)}")
            for key, value in state.items():
                if tuple(saved[name][key].shape) != tuple(value.shape):
                    raise ValueError(
                        f"tracker state {key}/{name} has shape {tuple(saved[name][key].shape)}, "
                        f"expected {tuple(value.shape)}"
                    )
        for name, state in self._state.items():
            for key, value in state.items():
                value.copy_(saved[name][key])

    def state_bytes(self) -> int:
        """Bytes of the tensors this tracker holds itself (reused statistics excluded)."""
        return sum(t.numel() * t.element_size() for st in self._state.values() for t in st.values())


def _export(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()
