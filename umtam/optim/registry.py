"""The optimizers `umtam train` can build, by name: one registration each, no torch imported here.

Each ``OptimizerSpec`` says what the command line needs to know without
building anything (default learning rate, which TrainConfig options configure
it, where it comes from) and names its builder as ``"module:function"``, which
is imported only when the optimizer is built. Adding an optimizer is one file
with a ``build(groups, hyperparameters)`` function plus its registration below.

Default learning rates: AdamW's is the usual BERT fine-tuning rate; UMTAM's is
4x higher, which DESIGN.md's MRPC probe found matched AdamW's dev scores; the
others come from bench/optim.py's sweep.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from umtam.registry import Registry


@dataclass(frozen=True)
class Hyperparameters:
    """What the trainer hands a builder; each optimizer reads the fields its spec lists."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None  # None: the optimizer's own default
    rank: int = 8
    error_feedback: bool = False


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    default_lr: float
    builder: str  # "module:function" taking (param groups, Hyperparameters)
    summary: str
    url: str | None = None
    # TrainConfig fields that configure it, besides lr, weight_decay and beta2 (every optimizer
    # takes the first two; beta2 is also the curvature tracker's, which runs beside every one)
    options: tuple[str, ...] = ()

    def build_function(self) -> Callable[[list[dict[str, Any]], Hyperparameters], Any]:
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer", normalise=lambda name: name.strip().lower())

for _spec in (
    OptimizerSpec("adamw", 5e-5, "umtam.optim.adamw:build", "torch.optim.AdamW, the fine-tuning baseline",
                  options=("beta1",)),
    OptimizerSpec("adafactor", 1e-4, "umtam.optim.adafactor:build",
                  "transformers' Adafactor as the HF Trainer's optim='adafactor'",
                  url="https://arxiv.org/abs/1804.04235"),
    OptimizerSpec("galore", 2e-4, "umtam.optim.galore:build", "GaLore-AdamW: AdamW in a rank-r gradient projection",
                  url="https://arxiv.org/abs/2403.03507", options=("rank", "beta1", "dense_lr")),
    OptimizerSpec("mofasgd", 1e-3, "umtam.optim.mofasgd:build",
                  "MoFaSGD: rank-r momentum, orthogonalised steps", url="https://arxiv.org/abs/2507.08091",
                  options=("rank", "beta1", "dense_lr")),
    OptimizerSpec("umtam", 2e-4, "umtam.optim.umtam:build",
                  "UMTAM: rank-r momentum over Adafactor's factored second moment",
                  url="https://arxiv.org/abs/2512.17109",
                  options=("rank", "beta1", "error_feedback", "dense_embeddings", "dense_lr")),
):
    OPTIMIZERS.register(_spec)
