"""The merge engine: checks the inputs, streams them row block by row block, writes the result.

Every input's model.safetensors (and stats.safetensors) is memory-mapped with
``safetensors.safe_open``. The engine takes one tensor name from all K inputs
and hands it to the method's pure function in row blocks of at most
``block_entries`` entries per input (a tensor that fits is one group, the
whole tensor); the merged rows are copied into that tensor's output and
nothing else is kept. Results do not depend on the block size: methods are
elementwise across the K inputs once a tensor's per-tensor quantities are
fixed, and those are passed in or derived from the whole tensor's statistics
(base.py).

Memory model (what the merge adds to the interpreter and torch, on Linux):

    merged output        one model: every merged tensor is held until
                         ``write_checkpoint``, because safetensors' ``save_file``
                         writes from one dict (each is allocated before its
                         block temporaries, so it pins no holes between them)
    working set          one block's float32 temporaries of K x block_entries
                         (task vectors, curvature, scores, signs, weights and
                         their products) plus the allocator's slack: 40 to 70 MiB
                         for K = 4 at the default block size
    mapped input pages   each block's pages are handed back once it is merged,
                         and every page of the files once a tensor is done
                         (pages.py: madvise on the file mapping; the page cache
                         keeps them), so about K blocks are resident, not K models
    base encoder W0      only when the method or ``norms="base"`` needs it: read
                         straight from the base model's safetensors when it is a
                         local directory, memory-mapped and fingerprint-checked
                         (``models.load_base_encoder``), then handed back like the
                         inputs. Its pages come and go before any output exists,
                         so they do not add to the peak. A base rebuilt through
                         transformers (the fallback) is held whole: about two
                         models more.

So the peak is about one model plus the working set, which alone grows with
K: 1.3 to 2 models above the import baseline for 4 MiniLM checkpoints
(bench/merge.py).
``MergePlan.estimated_peak_bytes`` follows this model. Where pages cannot be
handed back (not Linux), the mapped inputs and base stay resident as they are
read: page cache, counted in RSS, reclaimable.

The block loop runs on one torch thread (``_one_torch_thread``): its ops are
too small for intra-op threads to pay for their synchronisation.

Which tensors go where:

    2-D and higher floating weights (encoder)  -> the method, one row block at a time
    1-D floating parameters (biases, LayerNorm) -> option ``norms``: the "base" W0
                                                  (default, chosen on holdout scores)
                                                  or the "average" of the inputs
    non-floating tensors                       -> copied from the first input
    classification heads                       -> kept per task as heads/<task>/<key>,
                                                  never averaged; a merged input's
                                                  heads/... are carried over

Inputs are umtam checkpoints or plain Hugging Face directories (hf_interop).
A plain one records neither its base nor statistics, so it needs ``base``
(``--base``), is checked against that base by keys, shapes and relative
distance instead of the fingerprint (``_check_plain_against_base``, recorded
in the lineage), and is refused by methods that read statistics. The output
carries a config.<task>.json per task, so transformers loads the encoder with
any one head (``merged_companion_files``).

Methods that trim over all 2-D weights at once (``scope="global"``) get an
exact per-input threshold from a prepare pass: two extra streaming passes of
radix selection over the scores (``saliency.streaming_thresholds``), so no
concatenated score vector is built either. A per-tensor trim of a tensor split
into several row blocks gets its exact thresholds the same way, from two extra
passes over that tensor only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor

from umtam.checkpoint import (
    MODEL_FILE, SIDECAR_FILE, STATS_FILE, Checkpoint, check_output_dir, head_key, split_head_key,
    write_checkpoint,
)
from umtam.errors import CheckpointError, ConfigError, MergeError
from umtam.hf_interop import (CONFIG_FILE, TOKENIZER_FILES, is_config_file, is_plain, open_inputs,
                              task_configs)
from umtam.merge.base import MergeMethod, TensorGroup
from umtam.merge.methods import DEFAULT_METHOD, available_methods, get_method
from umtam.merge.pages import MappedPages
from umtam.models import identify_base, is_head_key, load_base_encoder
from umtam.saliency import RowBlock, missing_stat_error, required_stats, streaming_thresholds

Progress = Callable[[int, int, str], None]
InputLike = Union[str, Path, Checkpoint]

_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Entries per input in one row block: 1 MiB of float32 per input, so a block's
# (K, rows, n) temporaries stay in cache and the working set is a few MiB.
BLOCK_ENTRIES = 1 << 18
# Float32 buffers of one block's size in the peak working set, per input (task
# vectors, curvature, scores, signs, weights, products, the mapped rows and the
# allocator's slack) and shared (sums, W0 rows, result rows): fitted to the
# peaks bench/merge.py measures for umtam and ties, the most demanding methods.
_WORK_COPIES_PER_INPUT = 14
_WORK_COPIES_SHARED = 8
_HISTOGRAM_BYTES = ((1 << 15) + (1 << 16)) * 8  # per input, streaming thresholds
# A plain Hugging Face input farther than this from the base, relative to the base's
# norm, is refused (_check_plain_against_base says why 0.5 separates the cases).
MAX_PLAIN_DISTANCE = 0.5
_STATS_HINT = (
    "checkpoints from `umtam train` carry it (every optimizer records curvature); otherwise "
    "choose a method that needs no statistics (average, task-arithmetic, ties, dare, dare-ties) "
    "or umtam with trim=magnitude weights=uniform"
)


# ----------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class MergePlan:
    """What a merge would do (``--dry-run``), from the inputs' headers alone."""

    inputs: tuple[str, ...]
    tasks: tuple[str, ...]
    method: str
    options: dict[str, Any]
    tensor_count: int  # encoder tensors: method weights + 1-D parameters + others
    method_tensors: int  # of which the method merges (2-D and higher floating)
    head_tensors: int
    passes: int  # streaming passes over all inputs: 1, or 3 with a global trim (a per-tensor
    # trim of a tensor split into row blocks adds two over that tensor alone)
    needs_base: bool
    estimated_peak_bytes: int  # what the merge adds to the interpreter (module docstring)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": list(self.inputs), "tasks": list(self.tasks), "method": self.method,
            "options": dict(self.options), "tensor_count": self.tensor_count,
            "method_tensors": self.method_tensors, "head_tensors": self.head_tensors,
            "passes": self.passes, "needs_base": self.needs_base,
            "estimated_peak_bytes": self.estimated_peak_bytes,
        }


@dataclass(frozen=True)
class MergeReport:
    plan: MergePlan
    thresholds: dict[str, float] | None  # per input (task ids) for a global trim
    sidecar: dict[str, Any] = field(repr=False)


def plan(inputs: Sequence[InputLike], *, method: str = DEFAULT_METHOD,
         options: Mapping[str, Any] | None = None, base: str | None = None,
         task_names: Sequence[str] | None = None, block_entries: int = BLOCK_ENTRIES) -> MergePlan:
    """Validate a merge and estimate its cost without computing it (for --dry-run).

    The base is not read here; ``base`` only has to be given when an input is a
    plain Hugging Face directory.
    """
    spec, resolved, checkpoints = _prepare(inputs, method, options, base, task_names)
    with _open_inputs(checkpoints) as sources:
        layout = _check_compatible(sources)
        _check_stats(spec, resolved, sources, layout)
        return _make_plan(spec, resolved, sources, layout, block_entries)


def merge_tensors(inputs: Sequence[InputLike], *, method: str = DEFAULT_METHOD,
                  options: Mapping[str, Any] | None = None, base: str | None = None,
                  task_names: Sequence[str] | None = None, progress: Progress | None = None,
                  block_entries: int = BLOCK_ENTRIES) -> tuple[dict[str, Tensor], MergeReport]:
    """Merge the inputs into one state dict (encoder + heads/<task>/...) and the sidecar to write.

    ``base`` overrides where the base model is found (``--base``); it must match
    the inputs' recorded fingerprint. An input may be a plain Hugging Face
    directory (hf_interop): then ``base`` is required, the input is checked
    against it (``_check_plain_against_base``), its task comes from
    ``task_names`` (one per plain input, in order) or its config's
    finetuning_task, and only methods that need no statistics accept it.
    ``block_entries`` bounds the entries per input merged at once (memory, not
    results: any value gives the same bits).
    """
    if isinstance(block_entries, bool) or not isinstance(block_entries, int) or block_entries < 1:
        raise ConfigError(f"block_entries must be a positive integer, got {block_entries!r}")
    spec, resolved, checkpoints = _prepare(inputs, method, options, base, task_names)
    with _open_inputs(checkpoints) as sources:
        layout = _check_compatible(sources)
        _check_stats(spec, resolved, sources, layout)
        merge_plan = _make_plan(spec, resolved, sources, layout, block_entries)
        pages = MappedPages()
        base_record, base_tensors = _load_base(spec, resolved, sources, layout, base, pages)
        base_checks = _check_plain_against_base(sources, layout, base_tensors, pages)
        stream = _Stream(spec, resolved, sources, layout, base_tensors, pages, block_entries)
        steps = ProgressSteps(progress, _total_steps(merge_plan, layout))
        thresholds = None
        with _one_torch_thread():
            if spec.uses_global_trim(resolved) and layout.method_keys():
                thresholds = _global_thresholds(stream, steps)
            merged = _merge_encoder(stream, thresholds, steps)
        merged.update(_collect_heads(sources))
    threshold_record = None if thresholds is None else dict(zip((s.task_id for s in sources), thresholds))
    sidecar = _merged_sidecar(spec, resolved, sources, threshold_record, base_record, base_checks)
    return merged, MergeReport(merge_plan, threshold_record, sidecar)


def merge_checkpoints(inputs: Sequence[InputLike], output: str | Path, *, method: str = DEFAULT_METHOD,
                      options: Mapping[str, Any] | None = None, base: str | None = None,
                      task_names: Sequence[str] | None = None, force: bool = False,
                      progress: Progress | None = None,
                      block_entries: int = BLOCK_ENTRIES) -> tuple[Checkpoint, MergeReport]:
    """Merge checkpoints into a new checkpoint directory at ``output``.

    config.json and tokenizer files are copied (``merged_companion_files``) and
    a config.<task>.json is written per task, so transformers loads the encoder
    with any one head (hf_interop); the output carries no statistics. The
    sidecar has kind "merge", the union of the input tasks (each keeping its
    expert's metrics as "expert_metrics"), the shared base and the lineage:
    inputs with the sha256 of their model file, method, options.
    """
    checkpoints = _as_checkpoints(inputs, task_names)
    check_output_dir(output, inputs=[c.path for c in checkpoints], force=force)
    tensors, report = merge_tensors(checkpoints, method=method, options=options, base=base, progress=progress,
                                    block_entries=block_entries)
    written = write_checkpoint(
        output, tensors=tensors, sidecar=report.sidecar,
        extra_files=merged_companion_files(checkpoints, report.sidecar["tasks"], base), force=force,
    )
    return written, report


def companion_files(checkpoint: Checkpoint) -> dict[str, Path]:
    """config.json, tokenizer files: every listed file but the weights, statistics and sidecar."""
    skip = {MODEL_FILE, STATS_FILE, SIDECAR_FILE}
    return {name: checkpoint.path / name for name in sorted(checkpoint.sidecar["files"]) if name not in skip}


def merged_companion_files(checkpoints: Sequence[Checkpoint], tasks: Mapping[str, Any],
                           base: str | None = None) -> dict[str, Path | bytes]:
    """The merge's config.json, tokenizer files and one config.<task>.json per task.

    config.json and the tokenizer files each come from the first input that has
    them; tokenizer files otherwise from a local ``base`` directory, because a
    plain Hugging Face input is often saved without its tokenizer and
    ``umtam eval`` needs one.
    Per-task configs are written anew from the merged task records, never
    copied from a merged input.
    """
    files: dict[str, Path | bytes] = {}
    config = next((c.path / CONFIG_FILE for c in checkpoints if CONFIG_FILE in c.sidecar["files"]), None)
    if config is not None:
        files[CONFIG_FILE] = config
    files.update(_tokenizer_files(checkpoints, base))
    if config is not None:
        files.update(task_configs(config, tasks))
    return files


def _tokenizer_files(checkpoints: Sequence[Checkpoint], base: str | None) -> dict[str, Path]:
    for checkpoint in checkpoints:
        found = {name: path for name, path in companion_files(checkpoint).items() if not is_config_file(name)}
        if found:
            return found
    if base is not None and Path(base).is_dir():
        return {name: Path(base) / name for name in TOKENIZER_FILES if (Path(base) / name).is_file()}
    return {}


# ----------------------------------------------------------------------------- inputs


class _LazyStats(Mapping):
    """A checkpoint's statistics, read one tensor at a time from the memory-mapped file.

    The last few are kept: every row block of a tensor reads the same R and C.
    """

    _RECENT = 8

    def __init__(self, handle: Any | None):
        self._handle = handle
        self._keys = frozenset(handle.keys()) if handle is not None else frozenset()
        self._recent: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._recent:
            if len(self._recent) >= self._RECENT:
                del self._recent[next(iter(self._recent))]
            self._recent[key] = self._handle.get_tensor(key)
        return self._recent[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class _Source:
    checkpoint: Checkpoint
    model: Any  # safe_open handle
    stats: _LazyStats
    label: str
    task_id: str
    encoder_keys: frozenset[str]
    heads: dict[str, str]  # output key -> key in this input

    @property
    def plain(self) -> bool:
        """A plain Hugging Face directory: no statistics, no recorded base."""
        return is_plain(self.checkpoint)

    def tensor(self, key: str) -> Tensor:
        return self.model.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.model.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.model.get_slice(key).get_dtype()


@dataclass(frozen=True)
class _Layout:
    keys: tuple[str, ...]  # encoder keys, sorted
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def method_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if self.dtypes[k] in _FLOAT_DTYPES and len(self.shapes[k]) >= 2)

    def vector_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if self.dtypes[k] in _FLOAT_DTYPES and len(self.shapes[k]) < 2)


def _prepare(inputs, method, options, base, task_names) -> tuple[MergeMethod, dict[str, Any], list[Checkpoint]]:
    spec = get_method(method)
    resolved = spec.resolve_options(options)
    checkpoints = _as_checkpoints(inputs, task_names)
    _check_plain_inputs(spec, resolved, checkpoints, base)
    return spec, resolved, checkpoints


def _as_checkpoints(inputs: Sequence[InputLike], task_names: Sequence[str] | None = None) -> list[Checkpoint]:
    if isinstance(inputs, (str, Path, Checkpoint)) or len(inputs) < 2:
        count = 1 if isinstance(inputs, (str, Path, Checkpoint)) else len(inputs)
        raise ConfigError(f"merge needs at least 2 checkpoints, got {count}")
    return open_inputs(inputs, task_names)


def _check_plain_inputs(spec: MergeMethod, options: Mapping[str, Any], checkpoints: Sequence[Checkpoint],
                        base: str | None) -> None:
    """What a plain Hugging Face input cannot give: statistics, and its base (so --base is required)."""
    plain = [checkpoint for checkpoint in checkpoints if is_plain(checkpoint)]
    if not plain:
        return
    needed = _scores_reading_stats(spec, options)
    if needed:
        raise MergeError(
            f"{plain[0].path} is a plain Hugging Face directory without the training statistics that "
            f"merge method {spec.name} needs ({', '.join(needed)} saliency)",
            hint=f"use a weights-only method: {', '.join(_weights_only_methods())}",
        )
    if base is None:
        raise ConfigError(
            f"{plain[0].path} is a plain Hugging Face directory, which records no base model",
            hint="pass --base with the model it was fine-tuned from",
        )


def _scores_reading_stats(spec: MergeMethod, options: Mapping[str, Any]) -> tuple[str, ...]:
    """The saliency scores the method uses that read training statistics (magnitude does not)."""
    return tuple(dict.fromkeys(score for score in spec.stats_needed(options) if required_stats(score, "weight", 2)))


def _weights_only_methods() -> tuple[str, ...]:
    """Methods that, with their default options, read no statistics."""
    return tuple(name for name in available_methods()
                 if not _scores_reading_stats(get_method(name), get_method(name).resolve_options()))


@contextlib.contextmanager
def _open_inputs(checkpoints: Sequence[Checkpoint]) -> Iterator[list[_Source]]:
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        sources = []
        for checkpoint in checkpoints:
            model = stack.enter_context(safe_open(str(checkpoint.model_file), framework="pt"))
            stats_file = checkpoint.stats_file
            stats = stack.enter_context(safe_open(str(stats_file), framework="pt")) if stats_file else None
            sources.append(_describe(checkpoint, model, _LazyStats(stats)))
        yield sources


def _describe(checkpoint: Checkpoint, model: Any, stats: _LazyStats) -> _Source:
    label = str(checkpoint.path)
    encoder, heads = set(), {}
    for key in model.keys():
        if split_head_key(key) is not None:
            heads[key] = key  # a merged input's heads keep their task
        elif is_head_key(key):
            heads[head_key(_single_task(checkpoint, key), key)] = key
        else:
            encoder.add(key)
    return _Source(checkpoint, model, stats, label, "+".join(sorted(checkpoint.tasks)), frozenset(encoder), heads)


def _single_task(checkpoint: Checkpoint, key: str) -> str:
    tasks = list(checkpoint.tasks)
    if len(tasks) != 1:
        raise MergeError(
            f"{checkpoint.path}: head tensor {key!r} belongs to no single task (tasks: {', '.join(tasks)})",
            hint="a checkpoint with several tasks must store its heads as heads/<task>/<key>",
        )
    return tasks[0]


# ----------------------------------------------------------------------------- checks


def _check_compatible(sources: Sequence[_Source]) -> _Layout:
    first = sources[0]
    recorded = [source for source in sources if not source.plain]
    for other in recorded[1:]:
        _check_same_base(recorded[0], other)
    for other in sources[1:]:
        _check_same_keys(first, other)
    _check_distinct_tasks(sources)
    keys = tuple(sorted(first.encoder_keys))
    shapes = {key: first.shape(key) for key in keys}
    dtypes = {key: first.dtype(key) for key in keys}
    for other in sources[1:]:
        for key in keys:
            if other.shape(key) != shapes[key]:
                raise MergeError(
                    f"tensor {key!r} has shape {list(shapes[key])} in {first.label} "
                    f"but {list(other.shape(key))} in {other.label}",
                    hint="checkpoints of different architectures cannot be merged",
                )
    return _Layout(keys, shapes, dtypes)


def _check_same_base(first: _Source, other: _Source) -> None:
    a, b = first.checkpoint.base_fingerprint, other.checkpoint.base_fingerprint
    if a != b:
        raise MergeError(
            f"{first.label} and {other.label} were fine-tuned from different base models "
            f"(fingerprints {a[:12]}... and {b[:12]}...)",
            hint="merge only checkpoints trained from the same base weights",
        )


def _check_same_keys(first: _Source, other: _Source) -> None:
    difference = sorted(first.encoder_keys ^ other.encoder_keys)
    if difference:
        key = difference[0]
        has, lacks = (first, other) if key in first.encoder_keys else (other, first)
        raise MergeError(
            f"tensor {key!r} is in {has.label} but not in {lacks.label} "
            f"({len(difference)} encoder key(s) differ)",
            hint="checkpoints of different architectures cannot be merged",
        )


def _check_distinct_tasks(sources: Sequence[_Source]) -> None:
    owner: dict[str, _Source] = {}
    for source in sources:
        for task in source.checkpoint.tasks:
            if task in owner:
                raise MergeError(
                    f"task {task!r} is in both {owner[task].label} and {source.label}",
                    hint="merge one expert per task; each task keeps its own head",
                )
            owner[task] = source


def _check_stats(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[_Source],
                 layout: _Layout) -> None:
    """Report a missing statistic before any work, naming the checkpoint and the key."""
    for score_name in spec.stats_needed(options):
        for key in layout.method_keys():
            for stat_key in required_stats(score_name, key, len(layout.shapes[key])):
                for source in sources:
                    if stat_key not in source.stats:
                        error = missing_stat_error(source.label, stat_key, source.stats)
                        raise CheckpointError(f"{error.message} (needed by merge method {spec.name})",
                                              hint=_STATS_HINT)


def _needs_base(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[_Source]) -> bool:
    # a plain input is checked against the base, whatever the method
    return spec.needs_base or options["norms"] == "base" or any(source.plain for source in sources)


def _load_base(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[_Source], layout: _Layout,
               override: str | None, pages: MappedPages) -> tuple[dict[str, Any], Mapping[str, Tensor] | None]:
    """The merged sidecar's base record, and the base encoder when the merge reads it.

    The record is the one the umtam inputs share (``override`` must then hash
    to it); when every input is a plain Hugging Face directory it is made from
    ``override`` (required for them), which is read to fingerprint it.
    """
    recorded = [source for source in sources if not source.plain]
    if not recorded:
        record, base = identify_base(override, layout.keys)
    elif _needs_base(spec, options, sources):
        record = dict(recorded[0].checkpoint.sidecar["base_model"])
        base = load_base_encoder(record, override=override, keys=layout.keys)
    else:
        return dict(recorded[0].checkpoint.sidecar["base_model"]), None
    pages.release(*base.values())  # the fingerprint read every page; blocks fault back what they use
    label = (recorded or sources)[0].label
    for key in layout.keys:
        if key not in base:
            raise CheckpointError(f"the base model has no tensor {key!r}, which {label} has")
        if tuple(base[key].shape) != layout.shapes[key]:
            raise CheckpointError(
                f"tensor {key!r} has shape {list(base[key].shape)} in the base model "
                f"but {list(layout.shapes[key])} in {label}"
            )
    return record, base


def _check_plain_against_base(sources: Sequence[_Source], layout: _Layout, base: Mapping[str, Tensor] | None,
                              pages: MappedPages) -> dict[str, float]:
    """Refuse a plain input that does not look fine-tuned from the base; its distance per label.

    A plain directory records no base, so the fingerprint check cannot apply.
    Keys and shapes already match the base (_load_base); a model of the same
    architecture fine-tuned from other pretrained weights would pass that, so
    the relative distance ||W - W0|| / ||W0|| over the 2-D weights must stay
    below MAX_PLAIN_DISTANCE: this project's MiniLM experts (3 epochs, AdamW
    at 5e-5 to UMTAM at 5e-4) are 0.011 to 0.048 of the base's norm away from
    it, while unrelated weights of similar scale are about sqrt(2) apart.
    """
    distances = {}
    for source in sources:
        if not source.plain:
            continue
        distance = _relative_distance(source, layout, base, pages)
        if not distance < MAX_PLAIN_DISTANCE:
            raise MergeError(
                f"{source.label} does not look fine-tuned from the base model: its 2-D weights are "
                f"{distance:.3g} of the base's norm away (at most {MAX_PLAIN_DISTANCE} is accepted)",
                hint="pass the model it was fine-tuned from with --base",
            )
        distances[source.label] = distance
    return distances


def _relative_distance(source: _Source, layout: _Layout, base: Mapping[str, Tensor], pages: MappedPages) -> float:
    """||W - W0|| / ||W0|| over the method tensors, read in row blocks like the merge itself."""
    moved = total = 0.0
    for key in layout.method_keys():
        weight, start = source.tensor(key), base[key]
        for block in _row_blocks(layout.shapes[key], BLOCK_ENTRIES):
            rows = slice(None) if block is None else slice(block.start, block.stop)
            start32 = start[rows].to(torch.float32)
            moved += float(torch.sum((weight[rows].to(torch.float32) - start32) ** 2))
            total += float(torch.sum(start32 ** 2))
        pages.release_files(weight, start)
    return math.sqrt(moved / total) if total else (0.0 if moved == 0 else math.inf)


def _make_plan(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[_Source],
               layout: _Layout, block_entries: int = BLOCK_ENTRIES) -> MergePlan:
    """The plan, with the peak memory of the engine's memory model (module docstring).

    The estimate is what the merge adds to the interpreter: the held output or,
    before it exists, the base read once for its fingerprint, plus one row
    block's working set and the threshold histograms. Where mapped pages cannot
    be handed back, the inputs' and base's files count whole. A base rebuilt
    through transformers (no local safetensors to read) adds about two models.
    """
    method_keys = layout.method_keys()
    count = len(sources)
    numel = {key: math.prod(layout.shapes[key]) for key in layout.keys}
    block = max((_block_numel(layout.shapes[key], block_entries) for key in method_keys), default=0)
    work = (_WORK_COPIES_PER_INPUT * count + _WORK_COPIES_SHARED) * block * 4 + count * _HISTOGRAM_BYTES
    needs_base = _needs_base(spec, options, sources)
    base_bytes = sum(numel[key] * _dtype_size(layout.dtypes[key]) for key in layout.keys) if needs_base else 0
    output_bytes = sum(numel[key] * _dtype_size(layout.dtypes[key]) for key in layout.keys)
    head_count = 0
    for source in sources:
        head_count += len(source.heads)
        output_bytes += sum(math.prod(source.shape(k)) * _dtype_size(source.dtype(k)) for k in source.heads.values())
    if MappedPages().can_release:
        held = max(output_bytes, base_bytes)
    else:
        held = output_bytes + base_bytes + sum(source.checkpoint.model_file.stat().st_size for source in sources)
    return MergePlan(
        inputs=tuple(source.label for source in sources),
        tasks=tuple(task for source in sources for task in source.checkpoint.tasks),
        method=spec.name,
        options=dict(options),
        tensor_count=len(layout.keys),
        method_tensors=len(method_keys),
        head_tensors=head_count,
        passes=3 if spec.uses_global_trim(options) else 1,
        needs_base=needs_base,
        estimated_peak_bytes=held + work,
    )


def _dtype_size(dtype: str) -> int:
    return _FLOAT_DTYPES.get(dtype) or _OTHER_DTYPES.get(dtype, 4)


# ----------------------------------------------------------------------------- streaming passes


class ProgressSteps:
    """Counts work for the optional progress(done, total, name) callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def advance(self, name: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, name)


def _total_steps(merge_plan: MergePlan, layout: _Layout) -> int:
    prepare = 2 * merge_plan.method_tensors if merge_plan.passes == 3 else 0
    return prepare + len(layout.keys)


def _row_blocks(shape: Sequence[int], block_entries: int) -> list[RowBlock | None]:
    """The row blocks a tensor is merged in: [None] (the whole tensor) when it fits in one."""
    rows = shape[0] if shape else 1
    step = max(1, block_entries // max(1, math.prod(shape[1:])))
    if step >= rows:
        return [None]
    return [RowBlock(start, min(start + step, rows), rows) for start in range(0, rows, step)]


def _block_numel(shape: Sequence[int], block_entries: int) -> int:
    first = _row_blocks(shape, block_entries)[0]
    return math.prod(shape) if first is None else (first.stop - first.start) * math.prod(shape[1:])


class _Stream:
    """The method tensors of every input, served row block by row block to each pass."""

    def __init__(self, spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[_Source],
                 layout: _Layout, base: Mapping[str, Tensor] | None, pages: MappedPages, block_entries: int):
        self.spec, self.options, self.sources, self.layout = spec, options, sources, layout
        self.base, self.pages, self.block_entries = base, pages, block_entries
        self.stats = tuple(source.stats for source in sources)
        self.labels = tuple(source.label for source in sources)
        self.task_ids = tuple(source.task_id for source in sources)

    def blocks(self, key: str) -> list[RowBlock | None]:
        return _row_blocks(self.layout.shapes[key], self.block_entries)

    def groups(self, key: str, thresholds: Sequence[float] | None = None,
               streams: tuple[torch.Generator, ...] | None = None) -> Iterator[TensorGroup]:
        """The groups of ``key`` in row order; each block's mapped pages are handed back after use."""
        weights = [source.tensor(key) for source in self.sources]
        base = None if self.base is None else self.base[key]
        for block in self.blocks(key):
            rows = slice(None) if block is None else slice(block.start, block.stop)
            group = TensorGroup(
                name=key,
                weights=tuple(weight[rows] for weight in weights),
                base=None if base is None else base[rows],
                stats=self.stats,
                labels=self.labels,
                task_ids=self.task_ids,
                thresholds=None if thresholds is None else tuple(thresholds),
                block=block,
                streams=streams,
            )
            yield group
            self.pages.release(*group.weights, group.base)

    def release_files(self, key: str) -> None:
        """Hand back every mapped page of the inputs (and base) that hold ``key``."""
        self.pages.release_files(*(source.tensor(key) for source in self.sources),
                                 None if self.base is None else self.base[key])

    def trim_scores(self, key: str) -> Iterator[Tensor]:
        for group in self.groups(key):
            yield self.spec.trim_scores(group, self.options)

    def merge(self, key: str, thresholds: Sequence[float] | None) -> Tensor:
        """The merged tensor ``key``, built block by block."""
        spec, options = self.spec, self.options
        blocks = self.blocks(key)
        if thresholds is None and spec.trim_scores is not None and len(blocks) > 1:
            # A per-tensor trim needs the whole tensor's exact thresholds before any block.
            thresholds = streaming_thresholds(lambda: self.trim_scores(key), options["keep"])
        streams = None
        if spec.random_streams is not None and len(blocks) > 1:
            streams = spec.random_streams(key, self.task_ids, options)
        # Allocated before the block's temporaries, so that those are freed from the top
        # of the heap and the held outputs do not pin holes between them.
        merged = torch.empty(self.layout.shapes[key], dtype=self.sources[0].tensor(key).dtype)
        for group, block in zip(self.groups(key, thresholds, streams), blocks):
            rows = merged if block is None else merged[block.start:block.stop]
            rows.copy_(spec.merge(group, options))
        return merged


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run the block loop on one intra-op thread, restoring the caller's setting after.

    A block's ops take well under a millisecond, too little for torch's intra-op
    threads to win back their synchronisation; on a machine whose cores are busy
    (a training job beside the merge) each op also waits for a descheduled
    thread, and 1 MiB ops measured 30 to 80 times slower on 2 threads than on 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _global_thresholds(stream: _Stream, steps: ProgressSteps) -> list[float]:
    """Each input's exact trim threshold over all its 2-D weights (two streaming passes)."""

    def batches():
        for key in stream.layout.method_keys():
            yield from stream.trim_scores(key)
            stream.release_files(key)
            steps.advance(f"prepare {key}")

    return streaming_thresholds(batches, stream.options["keep"])


def _merge_encoder(stream: _Stream, thresholds: Sequence[float] | None,
                   steps: ProgressSteps) -> dict[str, Tensor]:
    merged: dict[str, Tensor] = {}
    layout, sources = stream.layout, stream.sources
    method_keys = set(layout.method_keys())
    vector_keys = set(layout.vector_keys())
    for key in layout.keys:
        if key in method_keys:
            merged[key] = stream.merge(key, thresholds)
        elif key in vector_keys:
            merged[key] = _merge_vector(key, sources, stream.base, stream.options["norms"])
        else:
            merged[key] = sources[0].tensor(key)  # integer buffers: nothing to merge
        stream.release_files(key)
        steps.advance(key)
    return merged


def _merge_vector(key: str, sources: Sequence[_Source], base: Mapping[str, Tensor] | None,
                  norms: str) -> Tensor:
    """1-D parameters follow the ``norms`` option, whatever the method."""
    weights = [source.tensor(key) for source in sources]
    if norms == "base":
        return base[key].to(weights[0].dtype, copy=True)
    return torch.stack([w.to(torch.float32) for w in weights]).mean(dim=0).to(weights[0].dtype)


def _collect_heads(sources: Sequence[_Source]) -> dict[str, Tensor]:
    """Every input's own head, under heads/<task>/<key>: heads are never averaged."""
    return {out_key: source.tensor(in_key) for source in sources for out_key, in_key in source.heads.items()}


# ----------------------------------------------------------------------------- sidecar


def _merged_sidecar(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[_Source],
                    thresholds: dict[str, float] | None, base_record: Mapping[str, Any],
                    base_checks: Mapping[str, float]) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for source in sources:
        for task, record in source.checkpoint.tasks.items():
            tasks[task] = unevaluated_task_record(record)
    lineage: dict[str, Any] = {
        "inputs": [_lineage_input(source, base_checks) for source in sources],
        "method": spec.name,
        "method_url": spec.url,
        "options": dict(options),
    }
    if thresholds is not None:
        lineage["thresholds"] = thresholds
    return {
        "kind": "merge",
        "tasks": tasks,
        "base_model": dict(base_record),
        "lineage": lineage,
    }


def _lineage_input(source: _Source, base_checks: Mapping[str, float]) -> dict[str, Any]:
    """An input as the lineage records it; a plain one says how its base was checked."""
    item: dict[str, Any] = {
        "path": str(source.checkpoint.path.resolve()),
        "sha256": source.checkpoint.sidecar["files"][MODEL_FILE]["sha256"],
        "tasks": list(source.checkpoint.tasks),
    }
    if source.plain:
        item["format"] = source.checkpoint.sidecar["format"]
        item["base_check"] = {"fingerprint": False, "keys_and_shapes": True,
                              "relative_distance": base_checks[source.label]}
    return item


def unevaluated_task_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """The task as a merged or pruned model has it: not evaluated yet, its expert's scores kept.

    Every "...metrics" field of the expert becomes "expert_...metrics" (so
    "metrics" -> "expert_metrics", the normaliser of merged scores); a merged
    or pruned input's expert_ fields stay as they are, so scores are always
    normalised by the original expert's.
    """
    unevaluated: dict[str, Any] = {}
    for key, value in record.items():
        if key.startswith("expert_") or not key.endswith("metrics"):
            unevaluated[key] = value
        elif f"expert_{key}" not in record:
            unevaluated[f"expert_{key}"] = value
    unevaluated["metrics"] = {}
    unevaluated.setdefault("expert_metrics", {})
    return unevaluated
