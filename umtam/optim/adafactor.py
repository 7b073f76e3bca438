"""Adafactor as the HF Trainer's ``optim="adafactor"`` (https://arxiv.org/abs/1804.04235).

transformers' implementation with ``scale_parameter=False, relative_step=False,
warmup_init=False``, the given lr and weight decay, and its own (eps1, eps2) =
(1e-30, 1e-3), no momentum and the 1 - t^-0.8 second-moment schedule, so the
trainer's betas and eps do not apply to it.
"""

from __future__ import annotations

from typing import Any


def build(groups: list[dict[str, Any]], hp):
    """The registry's builder (umtam.optim.registry): ``hp`` is a Hyperparameters."""
    from transformers.optimization import Adafactor  # slow import: only when asked for

    return Adafactor(groups, lr=hp.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                     weight_decay=hp.weight_decay)
