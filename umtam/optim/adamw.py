"""AdamW, the fine-tuning baseline: torch's own, with the HF Trainer's decay groups (umtam.optim)."""

from __future__ import annotations

from typing import Any

import torch

from umtam.optim.common import adam_arguments


def build(groups: list[dict[str, Any]], hp) -> torch.optim.AdamW:
    """The registry's builder (umtam.optim.registry): ``hp`` is a Hyperparameters."""
    return torch.optim.AdamW(groups, **adam_arguments(hp))
