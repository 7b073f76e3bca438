"""Optimizers by name, and the helpers the trainer needs to report on them.

The registry (umtam.optim.registry) lists them: adamw, adafactor, galore,
mofasgd, umtam. All are built with the HF Trainer's parameter grouping: weight
decay on matrices, none on vectors (biases, LayerNorm) or on anything named
"bias".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from umtam.errors import ConfigError
from umtam.optim.registry import OPTIMIZERS, Hyperparameters, OptimizerSpec

if TYPE_CHECKING:
    import torch
    from torch.nn import Parameter

# The optimizer classes load on first use (PEP 562), so the registry can be read without torch.
_LAZY = {"GaLoreAdamW": "umtam.optim.galore", "MoFaSGD": "umtam.optim.mofasgd", "UMTAM": "umtam.optim.umtam",
         "CurvatureTracker": "umtam.optim.tracker"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umtam.optim' has no attribute {name!r}")

__all__ = [
    "OPTIMIZERS",
    "CurvatureTracker",
    "GaLoreAdamW",
    "Hyperparameters",
    "MoFaSGD",
    "OptimizerSpec",
    "UMTAM",
    "build_optimizer",
    "effective_ranks",
    "optimizer_hparams",
    "optimizer_state_bytes",
]


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


def _embeddings_apart(groups: list[dict[str, Any]], named_parameters,
                      is_embedding: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Move the embedding matrices out of their group into one of their own with ``lowrank=False``."""
    embeddings = [p for name, p in named_parameters if p.requires_grad and p.dim() >= 2 and is_embedding(name)]
    if not embeddings:  # the switch would silently do nothing
        raise ConfigError("--dense-embeddings: the model has no embedding matrix its family names",
                          hint="see umtam.families for the names each family treats as embeddings")
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
    dense_lr: float | None = None,
    is_embedding: Callable[[str], bool] | None = None,
) -> torch.optim.Optimizer:
    """Build the registered optimizer ``name`` over the trainable parameters.

    ``eps=None`` keeps each optimizer's default (1e-8 for the Adam family).
    Options an optimizer's spec does not list (``rank`` for adamw, ``betas``
    for adafactor) do not reach it; ``error_feedback`` and ``dense_embeddings``
    (the embedding matrices, as ``is_embedding`` or the model family says, in
    a ``lowrank=False`` group: dense AdamW state for them) and ``dense_lr``
    (the rate of the groups a low-rank optimizer steps with AdamW: vectors, and
    those embeddings) are refused for an optimizer that does not list them.

    Raises:
        ConfigError: unknown name (listing the choices), an option the
            optimizer does not have, or a hyperparameter it rejects.
    """
    spec = OPTIMIZERS.get(name)
    for option, given in (("error_feedback", error_feedback), ("dense_embeddings", dense_embeddings),
                          ("dense_lr", dense_lr is not None)):
        if given and option not in spec.options:
            raise ConfigError(f"{option} is an option of the {optimizers_taking(option)} optimizer, "
                              f"not {spec.name!r}")
    named_parameters = list(named_parameters)
    groups = _decay_groups(named_parameters, weight_decay)
    if dense_embeddings:
        from umtam.families import generic_family

        groups = _embeddings_apart(groups, named_parameters, is_embedding or generic_family().is_embedding)
    if dense_lr is not None:
        groups = [{**group, "lr": dense_lr} if _stepped_densely(group) else group for group in groups]
    hyperparameters = Hyperparameters(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, rank=rank,
                                      error_feedback=error_feedback)
    try:
        return spec.build_function()(groups, hyperparameters)
    except ValueError as err:
        raise ConfigError(f"invalid hyperparameter for optimizer {spec.name!r}: {err}") from err


def _stepped_densely(group: dict[str, Any]) -> bool:
    """A group a low-rank optimizer steps with AdamW: vectors (no low-rank form), or lowrank=False."""
    return group.get("lowrank") is False or all(p.dim() < 2 for p in group["params"])


def optimizers_taking(option: str) -> str:
    """'umtam' or 'galore, mofasgd, umtam': the registered optimizers that take a TrainConfig option."""
    return ", ".join(spec.name for spec in OPTIMIZERS if option in spec.options)


def _tensor_bytes(value: Any) -> int:
    import torch

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
    import torch

    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def effective_ranks(optimizer: torch.optim.Optimizer,
                    named_parameters: Iterable[tuple[str, Parameter]] | None = None) -> dict[str, int]:
    """{parameter: rank used} for the matrices whose rank was clamped below the one asked for.

    UMTAM, GaLore and MoFaSGD clamp ``rank`` to min(m, n) per matrix
    (common.clamped_rank): rank 8 on a 2 x 384 token-type embedding or a
    2-label head uses 2. Clamping is right, but a sidecar that records only
    ``rank: 8`` would hide it, so the trainer records this map too. Empty when
    nothing was clamped or the optimizer takes no rank (adamw, adafactor).
    Parameters are named by ``named_parameters`` (the model's), otherwise as
    "group<g>.param<i>". Read from the param groups: no step is needed.
    """
    rank_used = getattr(optimizer, "rank_used", None)
    if rank_used is None:
        return {}
    names = {id(p): name for name, p in (named_parameters or ())}
    clamped = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            used = rank_used(p, group)
            if used is not None and used < group["rank"]:
                clamped[names.get(id(p), f"group{g}.param{i}")] = used
    return clamped


def optimizer_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """JSON-serialisable hyperparameters of ``param_groups[0]`` (params and param names left out)."""
    group = optimizer.param_groups[0]
    return {k: _jsonable(v) for k, v in group.items() if k not in ("params", "param_names")}
