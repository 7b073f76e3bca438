"""Optimizers by name, and the helpers the trainer needs to report on them.

    adamw      torch.optim.AdamW
    adafactor  transformers.optimization.Adafactor (as the HF Trainer's "adafactor")
    galore     GaLoreAdamW, https://arxiv.org/abs/2403.03507
    mofasgd    MoFaSGD, https://arxiv.org/abs/2507.08091
    umtam      UMTAM, https://arxiv.org/abs/2512.17109

All are built with the HF Trainer's parameter grouping: weight decay on
matrices, none on vectors (biases, LayerNorm) or on anything named "bias".
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import torch
from torch.nn import Parameter

from umtam.errors import ConfigError
from umtam.optim.galore import GaLoreAdamW
from umtam.optim.mofasgd import MoFaSGD
from umtam.optim.tracker import CurvatureTracker
from umtam.optim.umtam import UMTAM

__all__ = [
    "OPTIMIZERS",
    "CurvatureTracker",
    "GaLoreAdamW",
    "MoFaSGD",
    "UMTAM",
    "build_optimizer",
    "optimizer_hparams",
    "optimizer_state_bytes",
]

OPTIMIZERS = ("adamw", "adafactor", "galore", "mofasgd", "umtam")


def _decay_groups(named_parameters: Iterable[tuple[str, Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """HF Trainer's grouping: no decay for vectors (LayerNorm, biases) and anything named bias.

    The decay group comes first, so ``optimizer_hparams`` (group 0) reports
    the weight decay asked for. Frozen parameters are left out; empty groups
    are dropped.
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "bias" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _embeddings_apart(groups: list[dict[str, Any]], named_parameters) -> list[dict[str, Any]]:
    """Move the embedding matrices out of their group into one of their own with ``lowrank=False``."""
    embeddings = [p for name, p in named_parameters if p.requires_grad and p.dim() >= 2 and "embeddings." in name]
    moved = {id(p) for p in embeddings}
    kept = [{**group, "params": [p for p in group["params"] if id(p) not in moved]} for group in groups]
    dense = {"params": embeddings, "weight_decay": groups[0]["weight_decay"], "lowrank": False}
    return [group for group in (*kept, dense) if group["params"]]


def build_optimizer(
    name: str,
    named_parameters: Iterable[tuple[str, Parameter]],
    *,
    lr: float,
    rank: int = 8,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float | None = None,
    error_feedback: bool = False,
    dense_embeddings: bool = False,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over the trainable parameters.

    ``eps=None`` keeps each optimizer's default (1e-8 for the Adam family).
    ``rank`` applies to galore, mofasgd and umtam. Adafactor runs as the HF
    Trainer's ``optim="adafactor"``: ``scale_parameter=False,
    relative_step=False, warmup_init=False`` with the given lr and weight
    decay, and its own (eps1, eps2) = (1e-30, 1e-3), no momentum and the
    1 - t^-0.8 second-moment schedule, so ``betas`` and ``eps`` do not apply
    to it. ``error_feedback`` and ``dense_embeddings`` (the embedding matrices
    in a ``lowrank=False`` group: dense AdamW state for them) exist only for umtam.

    Raises:
        ConfigError: unknown name (listing the choices), an option the
            optimizer does not have, or a hyperparameter it rejects.
    """
    key = name.strip().lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=1)
        hint = f"choose one of {', '.join(OPTIMIZERS)}" + (f"; did you mean {close[0]!r}?" if close else "")
        raise ConfigError(f"unknown optimizer {name!r}", hint=hint)
    if error_feedback and key != "umtam":
        raise ConfigError(f"error_feedback is an option of the umtam optimizer, not {key!r}")
    if dense_embeddings and key != "umtam":
        raise ConfigError(f"dense_embeddings is an option of the umtam optimizer, not {key!r}")
    named_parameters = list(named_parameters)
    groups = _decay_groups(named_parameters, weight_decay)
    if dense_embeddings:
        groups = _embeddings_apart(groups, named_parameters)
    adam_kwargs: dict[str, Any] = {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay}
    if eps is not None:
        adam_kwargs["eps"] = eps
    try:
        if key == "adamw":
            return torch.optim.AdamW(groups, **adam_kwargs)
        if key == "adafactor":
            from transformers.optimization import Adafactor  # slow import: only when asked for

            return Adafactor(
                groups,
                lr=lr,
                scale_parameter=False,
                relative_step=False,
                warmup_init=False,
                weight_decay=weight_decay,
            )
        if key == "galore":
            return GaLoreAdamW(groups, rank=rank, **adam_kwargs)
        if key == "mofasgd":
            return MoFaSGD(groups, rank=rank, **adam_kwargs)
        return UMTAM(groups, rank=rank, error_feedback=error_feedback, **adam_kwargs)
    except ValueError as err:
        raise ConfigError(f"invalid hyperparameter for optimizer {key!r}: {err}") from err


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, factors, step counters)."""
    return sum(_tensor_bytes(state) for state in optimizer.state.values())


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """JSON-serialisable hyperparameters of ``param_groups[0]`` (params and param names left out)."""
    group = optimizer.param_groups[0]
    return {k: _jsonable(v) for k, v in group.items() if k not in ("params", "param_names")}
