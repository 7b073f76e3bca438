"""Prune a checkpoint's task vector: keep the most salient entries, reset the rest to the base.

One checkpoint in, one out (DESIGN section 5). For every 2-D (and higher)
encoder weight, T = W - W0 is scored by a saliency (``score``, default
"curvature": T^2 sqrt(R_i C_j)); the entries scoring at or above the threshold
keep their fine-tuned value, the others go back to W0 exactly
(``where(mask, W, W0)``, so keep=1.0 returns the input weights bit for bit).
Heads, 1-D parameters and non-floating tensors are kept as they are.

Threshold: the exact k-th largest score, k = round(keep * N) (at least 1), with
N the entries of all 2-D encoder weights (``scope="global"``, default) or of
each tensor (``scope="tensor"``). The global one is found by two streaming
radix-select passes over the scores (saliency.streaming_thresholds), so no
concatenated score vector is built. Every entry scoring >= the threshold is
kept: ties at the threshold keep all tied entries, so the measured kept
fraction can slightly exceed ``keep`` (the report and sidecar give the measured
value). Memory: the input model, the base encoder and the output, one model
each (the base memory-mapped straight from its safetensors file when it is a
local directory, see models.load_base_encoder); scores exist one tensor at a
time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from umtam.checkpoint import (
    MODEL_FILE, Checkpoint, check_output_dir, load_checkpoint, split_head_key, write_checkpoint,
)
from umtam.errors import CheckpointError, ConfigError
from umtam.merge.engine import ProgressSteps, companion_files, unevaluated_task_record
from umtam.models import is_head_key, load_base_encoder
from umtam.saliency import check_keep, get_score, score as saliency_score, streaming_thresholds, tensor_threshold

Progress = Callable[[int, int, str], None]
SCOPES = ("global", "tensor")
# Sidecar fields a pruned checkpoint must not inherit from its input.
_REPLACED_FIELDS = ("schema_version", "files", "kind", "lineage")


@dataclass(frozen=True)
class PruneReport:
    keep: float
    score: str
    scope: str
    threshold: float | None  # the global threshold; None with scope="tensor"
    kept_entries: int
    total_entries: int
    tensors: dict[str, float] = field(default_factory=dict)  # measured kept fraction per tensor

    @property
    def kept_fraction(self) -> float:
        return self.kept_entries / self.total_entries if self.total_entries else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep, "score": self.score, "scope": self.scope, "threshold": self.threshold,
            "kept_fraction": self.kept_fraction, "kept_entries": self.kept_entries,
            "total_entries": self.total_entries, "tensors": dict(self.tensors),
        }


def prune_checkpoint(ckpt: Checkpoint | str | Path, *, keep: float, score: str = "curvature",
                     scope: str = "global", base: str | None = None,
                     progress: Progress | None = None) -> tuple[dict[str, Tensor], PruneReport]:
    """The pruned state dict of ``ckpt`` and what was kept.

    ``base`` overrides where the base model is found (``--base``); it must match
    the checkpoint's recorded fingerprint.
    """
    keep = check_keep(keep)
    get_score(score)
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    checkpoint = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    tensors = checkpoint.load_tensors()
    stats = checkpoint.load_stats()
    names = prunable_names(tensors)
    encoder_keys = [key for key in tensors if not is_head_key(key) and split_head_key(key) is None]
    base_tensors = (load_base_encoder(checkpoint.sidecar["base_model"], override=base, keys=encoder_keys)
                    if names else {})
    label = str(checkpoint.path)
    _check_base_covers(base_tensors, tensors, names, label)

    def scores_of(name: str) -> Tensor:
        task_vector = tensors[name].to(torch.float32) - base_tensors[name].to(torch.float32)
        return saliency_score(score, name, task_vector, stats, checkpoint_label=label)

    total_steps = len(names) * (3 if scope == "global" and names else 1)
    steps = ProgressSteps(progress, total_steps)
    threshold = None
    if scope == "global" and names:
        threshold = _global_threshold(names, scores_of, keep, steps)

    pruned = dict(tensors)
    kept_per_tensor: dict[str, float] = {}
    kept_entries = total_entries = 0
    for name in names:
        scores = scores_of(name)
        limit = threshold if threshold is not None else tensor_threshold(scores, keep)
        mask = scores >= limit
        pruned[name] = torch.where(mask, tensors[name], base_tensors[name].to(tensors[name].dtype))
        kept = int(mask.sum())
        kept_entries += kept
        total_entries += mask.numel()
        kept_per_tensor[name] = kept / mask.numel()
        steps.advance(name)
    report = PruneReport(keep, score, scope, threshold, kept_entries, total_entries, kept_per_tensor)
    return pruned, report


def write_pruned(ckpt: Checkpoint | str | Path, output: str | Path, *, keep: float, score: str = "curvature",
                 scope: str = "global", base: str | None = None, force: bool = False,
                 progress: Progress | None = None) -> tuple[Checkpoint, PruneReport]:
    """Prune ``ckpt`` into a new checkpoint directory at ``output``.

    Statistics, config.json and tokenizer files are copied through; the sidecar
    keeps the input's tasks (their scores moved to expert_metrics, since they
    describe the unpruned weights), base and free fields, with kind "prune" and lineage
    {inputs: [{path, sha256}], method: {keep, score, scope}, threshold,
    kept_fraction (measured)}.
    """
    checkpoint = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    check_output_dir(output, inputs=[checkpoint.path], force=force)
    tensors, report = prune_checkpoint(checkpoint, keep=keep, score=score, scope=scope, base=base,
                                       progress=progress)
    written = write_checkpoint(
        output,
        tensors=tensors,
        sidecar=pruned_sidecar(checkpoint, report),
        stats=checkpoint.load_stats() or None,
        extra_files=companion_files(checkpoint),
        force=force,
    )
    return written, report


def pruned_sidecar(checkpoint: Checkpoint, report: PruneReport) -> dict[str, Any]:
    inherited = {key: value for key, value in checkpoint.sidecar.items() if key not in _REPLACED_FIELDS}
    # The input's scores describe the unpruned weights: they move to expert_metrics
    # (the normaliser eval reports against), and metrics waits for `umtam eval`.
    tasks = {task: unevaluated_task_record(record) for task, record in checkpoint.tasks.items()}
    return {
        **inherited,
        "tasks": tasks,
        "kind": "prune",
        "lineage": {
            "inputs": [{"path": str(checkpoint.path.resolve()),
                        "sha256": checkpoint.sidecar["files"][MODEL_FILE]["sha256"]}],
            "method": {"keep": report.keep, "score": report.score, "scope": report.scope},
            "threshold": report.threshold,
            "kept_fraction": report.kept_fraction,
        },
    }


def prunable_names(tensors: Mapping[str, Tensor]) -> list[str]:
    """Encoder weights of rank >= 2: heads (own or heads/<task>/...) and 1-D parameters stay."""
    return sorted(
        name for name, tensor in tensors.items()
        if tensor.dim() >= 2 and tensor.is_floating_point()
        and not is_head_key(name) and split_head_key(name) is None
    )


def _check_base_covers(base: Mapping[str, Tensor], tensors: Mapping[str, Tensor], names, label: str) -> None:
    for name in names:
        if name not in base:
            raise CheckpointError(f"the base model has no tensor {name!r}, which {label} has")
        if base[name].shape != tensors[name].shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(base[name].shape)} in the base model "
                f"but {list(tensors[name].shape)} in {label}"
            )


def _global_threshold(names, scores_of: Callable[[str], Tensor], keep: float, steps: ProgressSteps) -> float:
    def batches():
        for name in names:
            scores = scores_of(name)
            steps.advance(f"threshold {name}")
            yield (scores,)

    return streaming_thresholds(batches, keep)[0]

