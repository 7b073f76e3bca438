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
local directory, see base_model.load_base_encoder); scores exist one tensor at
a time.

The options (keep, score, scope) are ``PruneSettings`` (umtam.config.prune):
their defaults and ranges are declared there once, and the keyword arguments
of ``prune_checkpoint`` and ``write_pruned`` are validated by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from umtam.atomic import check_output_dir
from umtam.base_model import check_base_covers, load_base_encoder
from umtam.checkpoint import MODEL_FILE, Checkpoint, load_checkpoint, write_checkpoint
from umtam.config import build_config
from umtam.config.prune import PruneSettings
from umtam.families import family_of_dir
from umtam.heads import is_head_key
from umtam.progress import Progress, ProgressSteps
from umtam.saliency import score as saliency_score
from umtam.saliency import streaming_thresholds, tensor_threshold
from umtam.sidecar import Sidecar

# Sidecar fields a pruned checkpoint must not inherit from its input.
_REPLACED_FIELDS = ("schema_version", "files", "kind", "lineage", "tasks")


@dataclass(frozen=True)
class PruneReport:
    settings: PruneSettings
    threshold: float | None  # the global threshold; None with scope="tensor"
    kept_entries: int
    total_entries: int
    tensors: dict[str, float] = field(default_factory=dict)  # measured kept fraction per tensor

    @property
    def keep(self) -> float:
        return self.settings.keep

    @property
    def score(self) -> str:
        return self.settings.score

    @property
    def scope(self) -> str:
        return self.settings.scope

    @property
    def kept_fraction(self) -> float:
        return self.kept_entries / self.total_entries if self.total_entries else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep, "score": self.score, "scope": self.scope, "threshold": self.threshold,
            "kept_fraction": self.kept_fraction, "kept_entries": self.kept_entries,
            "total_entries": self.total_entries, "tensors": dict(self.tensors),
        }


def prune_settings(**given: Any) -> PruneSettings:
    """keep, score and scope, validated (ConfigError naming every problem); defaults from PruneSettings."""
    return build_config(PruneSettings, given, source="prune options")


def prune_checkpoint(ckpt: Checkpoint | str | Path, *, base: str | None = None, progress: Progress | None = None,
                     **settings: Any) -> tuple[dict[str, Tensor], PruneReport]:
    """The pruned state dict of ``ckpt`` and what was kept; ``settings`` are PruneSettings' keep, score, scope.

    ``base`` overrides where the base model is found (``--base``); it must match
    the checkpoint's recorded fingerprint.
    """
    chosen = prune_settings(**settings)
    checkpoint = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    tensors = checkpoint.load_tensors()
    stats = checkpoint.load_stats()
    family = family_of_dir(checkpoint.path)
    names = prunable_names(tensors, is_head=lambda key: is_head_key(key, family))
    encoder_keys = [key for key in tensors if not is_head_key(key, family)]
    label = str(checkpoint.path)
    base_tensors = {}
    if names:
        base_tensors = load_base_encoder(checkpoint.sidecar.base_model, override=base, keys=encoder_keys)
        check_base_covers(base_tensors, {name: tuple(tensors[name].shape) for name in names}, label)

    def scores_of(name: str) -> Tensor:
        task_vector = tensors[name].to(torch.float32) - base_tensors[name].to(torch.float32)
        return saliency_score(chosen.score, name, task_vector, stats, checkpoint_label=label)

    steps = ProgressSteps(progress, len(names) * (3 if chosen.scope == "global" and names else 1))
    threshold = None
    if chosen.scope == "global" and names:
        threshold = _global_threshold(names, scores_of, chosen.keep, steps)

    pruned = dict(tensors)
    kept_per_tensor: dict[str, float] = {}
    kept_entries = total_entries = 0
    for name in names:
        scores = scores_of(name)
        limit = threshold if threshold is not None else tensor_threshold(scores, chosen.keep)
        mask = scores >= limit
        pruned[name] = torch.where(mask, tensors[name], base_tensors[name].to(tensors[name].dtype))
        kept = int(mask.sum())
        kept_entries += kept
        total_entries += mask.numel()
        kept_per_tensor[name] = kept / mask.numel()
        steps.advance(name)
    report = PruneReport(chosen, threshold, kept_entries, total_entries, kept_per_tensor)
    return pruned, report


def write_pruned(ckpt: Checkpoint | str | Path, output: str | Path, *, base: str | None = None,
                 force: bool = False, progress: Progress | None = None,
                 **settings: Any) -> tuple[Checkpoint, PruneReport]:
    """Prune ``ckpt`` into a new checkpoint directory at ``output`` (``settings`` as prune_checkpoint's).

    Statistics, config.json and tokenizer files are copied through; the sidecar
    keeps the input's tasks (their scores moved to expert_metrics, since they
    describe the unpruned weights), base and free fields, with kind "prune" and lineage
    {inputs: [{path, sha256}], method: {keep, score, scope}, threshold,
    kept_fraction (measured)}.
    """
    prune_settings(**settings)  # a bad option is refused before the inputs are read
    checkpoint = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    check_output_dir(output, inputs=[checkpoint.path], force=force)
    tensors, report = prune_checkpoint(checkpoint, base=base, progress=progress, **settings)
    written = write_checkpoint(
        output,
        tensors=tensors,
        sidecar=pruned_sidecar(checkpoint.sidecar, checkpoint.path, report),
        stats=checkpoint.load_stats() or None,
        extra_files=checkpoint.companion_files(),
        force=force,
    )
    return written, report


def pruned_sidecar(sidecar: Sidecar, path: Path, report: PruneReport) -> dict[str, Any]:
    """The input's sidecar with kind "prune", unevaluated tasks and the prune's lineage."""
    inherited = {key: value for key, value in sidecar.as_json().items() if key not in _REPLACED_FIELDS}
    # The input's scores describe the unpruned weights: they move to expert_metrics
    # (the normaliser eval reports against), and metrics waits for `umtam eval`.
    tasks = {task: record.unevaluated().as_json() for task, record in sidecar.tasks.items()}
    return {
        **inherited,
        "tasks": tasks,
        "kind": "prune",
        "lineage": {
            "inputs": [{"path": str(path.resolve()), "sha256": sidecar.file_sha256(MODEL_FILE)}],
            "method": report.settings.recorded(),
            "threshold": report.threshold,
            "kept_fraction": report.kept_fraction,
        },
    }


def prunable_names(tensors: Mapping[str, Tensor], is_head: Callable[[str], bool] = is_head_key) -> list[str]:
    """Encoder weights of rank >= 2: heads (own or heads/<task>/...) and 1-D parameters stay."""
    return sorted(name for name, tensor in tensors.items()
                  if tensor.dim() >= 2 and tensor.is_floating_point() and not is_head(name))


def _global_threshold(names, scores_of: Callable[[str], Tensor], keep: float, steps: ProgressSteps) -> float:
    def batches():
        for name in names:
            scores = scores_of(name)
            steps.advance(f"threshold {name}")
            yield (scores,)

    return streaming_thresholds(batches, keep)[0]
