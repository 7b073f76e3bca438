"""Prune a checkpoint's task vector: keep the most salient entries, reset the rest to the base.

One checkpoint in, one out (DESIGN section 5). For every 2-D (and higher)
encoder weight, T = W - W0 is scored by a saliency (``score``, default
"curvature-row": T^2 sqrt(C_j) / mean sqrt(C), umtam.scores); the k most salient entries keep their
fine-tuned value, the others go back to W0 exactly (``where(mask, W, W0)``, so
keep=1.0 returns the input weights bit for bit). Heads, 1-D parameters and
integer buffers are kept as they are.

Exactly k = round(keep * N) entries are kept (at least 1), with N the entries
of all 2-D encoder weights (``scope="global"``, default) or of each tensor
(``scope="tensor"``). The threshold is the exact k-th largest score; every
entry above it is kept, and of the entries scoring exactly the threshold the
first ones in a fixed order (tensors in name order, entries in row-major
order) until k are kept (saliency.Cut). Without the tie rule the zero
curvature of rows no gradient reached ties at a threshold of 0 and
``keep=0.5`` could keep everything. The global cut is found by two streaming
radix-select passes over the scores (saliency.streaming_cuts), so no
concatenated score vector is built. Memory: the input model, the base encoder
and the output, one model each (the base memory-mapped straight from its
safetensors file when it is a local directory, see
base_model.load_base_encoder); scores exist one tensor at a time.

Checks, as each tensor is read: every encoder tensor must match the base's
shape and kind of dtype (base_model.check_base_covers), so a weight stored as
integers or as a vector is refused instead of copied through unpruned; every
floating tensor must be finite, and so must the base tensors pruning resets to
(saliency.task_vector, check_finite). The output then holds only entries of
the two, each checked, so it is finite too (where a base entry is cast to the
checkpoint's narrower dtype, the cast is checked).

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
from umtam.base_model import check_base_covers, describe_base, dtype_name, load_base_encoder
from umtam.checkpoint import Checkpoint, load_checkpoint, write_checkpoint
from umtam.config import build_config
from umtam.config.prune import PruneSettings
from umtam.errors import CheckpointError
from umtam.families import family_of_dir
from umtam.heads import check_head_labels, is_head_key
from umtam.progress import Progress, ProgressSteps
from umtam.saliency import Selection, all_finite, check_finite, streaming_cuts, task_vector, tensor_cut
from umtam.saliency import score as saliency_score
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
    check_head_labels(checkpoint, {key: tuple(value.shape) for key, value in tensors.items()}, family)
    label = str(checkpoint.path)
    encoder_keys = [key for key in tensors if not is_head_key(key, family)]
    base_tensors = {}
    if encoder_keys:
        base_tensors = load_base_encoder(checkpoint.sidecar.base_model, override=base, keys=encoder_keys)
        check_base_covers(base_tensors, {key: tuple(tensors[key].shape) for key in encoder_keys}, label,
                          dtypes={key: tensors[key].dtype for key in encoder_keys})
    names = prunable_names(tensors, is_head=lambda key: is_head_key(key, family))
    for key in sorted(set(tensors) - set(names)):  # copied through: heads, 1-D parameters, buffers
        check_finite(tensors[key], tensor_name=key, owner=label)
    base_label = describe_base(checkpoint.sidecar.base_model, base)

    def scores_of(name: str) -> Tensor:
        vector = task_vector(name, tensors[name], base_tensors[name], checkpoint_label=label, base_label=base_label)
        return saliency_score(chosen.score, name, vector, stats, checkpoint_label=label)

    steps = ProgressSteps(progress, len(names) * (3 if chosen.scope == "global" and names else 1))
    threshold = shared = None
    if chosen.scope == "global" and names:
        cut = _global_cut(names, scores_of, chosen.keep, steps)
        threshold, shared = cut.threshold, Selection(cut)  # its tie allowance is spent in name order

    pruned = dict(tensors)
    kept_per_tensor: dict[str, float] = {}
    kept_entries = total_entries = 0
    for name in names:
        scores = scores_of(name)
        selection = shared if shared is not None else Selection(tensor_cut(scores, chosen.keep))
        mask = selection.mask(scores)
        pruned[name] = _reset_to_base(name, mask, tensors[name], base_tensors[name], chosen)
        kept = int(mask.sum())
        kept_entries += kept
        total_entries += mask.numel()
        kept_per_tensor[name] = kept / mask.numel()
        steps.advance(name)
    report = PruneReport(chosen, threshold, kept_entries, total_entries, kept_per_tensor)
    return pruned, report


def _reset_to_base(name: str, mask: Tensor, weight: Tensor, base: Tensor, chosen: PruneSettings) -> Tensor:
    """W where kept, W0 elsewhere; both are checked finite, but W0 cast to a narrower dtype can overflow."""
    pruned = torch.where(mask, weight, base.to(weight.dtype))
    if base.dtype != weight.dtype and not all_finite(pruned):
        raise CheckpointError(
            f"pruning ({', '.join(f'{key}={value}' for key, value in chosen.recorded().items())}) would write "
            f"NaN or inf into tensor {name!r}: the base model's "
            f"{dtype_name(base.dtype)} values overflow the checkpoint's {dtype_name(weight.dtype)}",
            hint="nothing was written; the checkpoint's weights were not saved in the base's precision",
        )
    return pruned


def write_pruned(ckpt: Checkpoint | str | Path, output: str | Path, *, base: str | None = None,
                 force: bool = False, progress: Progress | None = None, out_dtype: str | None = None,
                 shard_bytes: int | None = None, **settings: Any) -> tuple[Checkpoint, PruneReport]:
    """Prune ``ckpt`` into a new checkpoint directory at ``output`` (``settings`` as prune_checkpoint's).

    Statistics, config.json and tokenizer files are copied through; the sidecar
    keeps the input's tasks (their scores moved to expert_metrics, since they
    describe the unpruned weights), base and free fields, with kind "prune" and lineage
    {inputs: [{path, sha256}], method: {keep, score, scope}, threshold,
    kept_fraction (measured)}. Floating tensors are stored as the input stores
    them, or as ``out_dtype`` ("fp32", "bf16", "fp16"; then recorded in the
    lineage), in one file or in shards of at most ``shard_bytes``.
    """
    prune_settings(**settings)  # a bad option is refused before the inputs are read
    checkpoint = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(ckpt)
    check_output_dir(output, inputs=[checkpoint.path], force=force)
    tensors, report = prune_checkpoint(checkpoint, base=base, progress=progress, **settings)
    sidecar = pruned_sidecar(checkpoint.sidecar, checkpoint.path, report)
    if out_dtype is not None:
        tensors = stored_as(tensors, out_dtype)
        sidecar["lineage"]["out_dtype"] = out_dtype
    written = write_checkpoint(
        output,
        tensors=tensors,
        shard_bytes=shard_bytes,
        sidecar=sidecar,
        stats=checkpoint.load_stats() or None,
        extra_files=companions_stored_as(checkpoint.companion_files(), out_dtype),
        force=force,
        inputs=[checkpoint],  # re-checked before the sidecar: an input rewritten meanwhile is refused
    )
    return written, report


def companions_stored_as(files: Mapping[str, Path], out_dtype: str | None) -> dict[str, Path | bytes]:
    """The input's companion files, its configs naming ``out_dtype`` where the weights are stored in it."""
    from umtam.hf_interop import config_stored_as, is_config_file

    return {name: config_stored_as(path, out_dtype) if is_config_file(name) else path for name, path in files.items()}


def stored_as(tensors: Mapping[str, Tensor], out_dtype: str) -> dict[str, Tensor]:
    """Floating tensors cast to ``out_dtype``; a value the dtype cannot hold is refused, naming the tensor."""
    from umtam.precision import torch_dtype

    target = torch_dtype(out_dtype)
    cast = {}
    for name, tensor in tensors.items():
        cast[name] = tensor.to(target) if tensor.is_floating_point() else tensor
        if not all_finite(cast[name]):
            raise CheckpointError(f"tensor {name!r} overflows {out_dtype}: --out-dtype {out_dtype} cannot hold it",
                                  hint="nothing was written; use a wider --out-dtype")
    return cast


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
            "inputs": [{"path": str(path.resolve()), "sha256": sidecar.weights_sha256()}],
            "method": report.settings.recorded(),
            "threshold": report.threshold,
            "kept_fraction": report.kept_fraction,
        },
    }


def prunable_names(tensors: Mapping[str, Tensor], is_head: Callable[[str], bool] = is_head_key) -> list[str]:
    """Floating encoder weights of rank >= 2, in name order: heads (own or heads/<task>/...) and 1-D parameters stay.

    What is left out is copied through as it is, so prune first checks every
    encoder tensor against the base (shape and kind of dtype): an integer or
    1-D tensor where the base has a floating matrix is refused, not skipped.
    """
    return sorted(name for name, tensor in tensors.items()
                  if tensor.dim() >= 2 and tensor.is_floating_point() and not is_head(name))


def _global_cut(names, scores_of: Callable[[str], Tensor], keep: float, steps: ProgressSteps):
    def batches():
        for name in names:
            scores = scores_of(name)
            steps.advance(f"threshold {name}")
            yield (scores,)

    return streaming_cuts(batches, keep)[0]
