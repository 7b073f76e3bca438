"""The merge engine: streams the inputs row block by row block through a method, and the result to disk.

The engine takes one tensor name from all K memory-mapped inputs (inputs.py)
and hands it to the method's pure function in row blocks of at most
``block_entries`` entries per input (blocks.py; a tensor that fits is one
group, the whole tensor); the merged rows are copied into that tensor's output,
which goes to its place in the output file at once (output.py, umtam.shards),
and nothing else is kept. Results do not depend on the block size: methods are
elementwise across the K inputs once a tensor's per-tensor quantities are
fixed, and those are passed in or derived from the whole tensor's statistics
(group.py). Each block's mapped pages are handed back once it is merged
(pages.py), so the peak is about one model plus a working set (planning.py has the
memory model and the estimate ``--dry-run`` prints).

Which tensors go where:

    2-D and higher floating weights (encoder)  -> the method, one row block at a time
    1-D floating parameters (biases, LayerNorm) -> option ``norms``: the "base" W0
                                                  (default, chosen on holdout scores)
                                                  or the "average" of the inputs
    non-floating tensors                       -> copied from the first input
    classification heads                       -> kept per task as heads/<task>/<key>,
                                                  never averaged; a merged input's
                                                  heads/... are carried over

Methods that trim over all 2-D weights at once (``scope="global"``) get an
exact per-input cut from a prepare pass: two extra streaming passes of radix
selection over the scores (``saliency.streaming_cuts``), so no concatenated
score vector is built either. A per-tensor trim of a tensor split into several
row blocks gets its exact cuts the same way, from two extra passes over that
tensor only. A trim keeps exactly k entries per input: those above the
threshold, then the entries tied at it in a fixed order (tensors in name
order, rows in order) until k are kept, so each input's cut is one
``saliency.Selection`` whose tie allowance the groups use up as they come.
The block loop runs on one torch thread (``threads.one_torch_thread``): its ops are
too small for intra-op threads to pay for their synchronisation. Instead
MERGE_WORKERS tensors are merged at once, each by its own thread, and handed
to the output in name order (a global trim, whose tie allowance runs across
tensors in that order, merges one at a time).

Numbers are checked as the data streams, never in a pass of their own: every
input's (and the base's) rows are checked finite the first time a pass reads
them (through the merged rows for a method whose output carries every input
entry, ``MergeMethod.output_checks_inputs``), 1-D parameters and heads when
they are read, and every merged block before it is kept, so a method's overflow (``task-arithmetic`` with a huge
lambda) is refused naming the tensor and the options before anything is
written. Every input tensor must also have the kind of dtype of the base's
(and of the other inputs'), so an integer or 1-D weight is refused rather than
copied through unmerged.

Inputs are umtam checkpoints or plain Hugging Face directories (hf_interop,
plain_inputs.py); the output carries a config.<task>.json per task, so
transformers loads the encoder with any one head.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import Tensor

from umtam.atomic import check_output_dir
from umtam.base_model import describe_base, dtype_name
from umtam.checkpoint import Checkpoint, write_checkpoint
from umtam.errors import ConfigError, MergeError
from umtam.hf_interop import merged_companion_files, open_inputs
from umtam.merge.base import MergeMethod
from umtam.merge.base_weights import load_base
from umtam.merge.blocks import BLOCK_ENTRIES, MERGE_WORKERS, row_blocks, row_slice
from umtam.merge.group import TensorGroup
from umtam.merge.inputs import Layout, Source, check_compatible, check_dtype_kinds, check_stats, open_sources
from umtam.merge.methods import DEFAULT_METHOD, get_method
from umtam.merge.output import Sink, output_entries
from umtam.merge.pages import MappedPages
from umtam.merge.plain_inputs import check_against_base, check_plain_inputs
from umtam.merge.planning import MergePlan, make_plan
from umtam.merge.record import merged_sidecar
from umtam.merge.threads import in_order, one_torch_thread
from umtam.precision import torch_dtype
from umtam.progress import Progress, ProgressSteps
from umtam.saliency import Cut, RowBlock, Selection, all_finite, check_finite, non_finite_where, streaming_cuts

InputLike = Union[str, Path, Checkpoint]


@dataclass(frozen=True)
class MergeReport:
    plan: MergePlan
    thresholds: dict[str, float] | None  # per input (task ids) for a global trim: the k-th largest score
    sidecar: dict[str, Any] = field(repr=False)


def plan(inputs: Sequence[InputLike], *, method: str = DEFAULT_METHOD,
         options: Mapping[str, Any] | None = None, base: str | None = None,
         task_names: Sequence[str] | None = None, block_entries: int = BLOCK_ENTRIES) -> MergePlan:
    """Validate a merge and estimate its cost without computing it (for --dry-run).

    The base is not read here; ``base`` only has to be given when an input is a
    plain Hugging Face directory.
    """
    spec, resolved, checkpoints = _prepare(inputs, method, options, base, task_names)
    with open_sources(checkpoints) as sources:
        layout = check_compatible(sources)
        check_dtype_kinds(sources, layout)
        check_stats(spec, resolved, sources, layout)
        for source in sources:
            source.checkpoint.settle()
        return make_plan(spec, resolved, sources, layout, block_entries)


def merge_tensors(inputs: Sequence[InputLike], *, method: str = DEFAULT_METHOD,
                  options: Mapping[str, Any] | None = None, base: str | None = None,
                  task_names: Sequence[str] | None = None, progress: Progress | None = None,
                  block_entries: int = BLOCK_ENTRIES, out_dtype: str | None = None,
                  ) -> tuple[dict[str, Tensor], MergeReport]:
    """Merge the inputs into one state dict (encoder + heads/<task>/...) and the sidecar to write.

    ``base`` overrides where the base model is found (``--base``); it must match
    the inputs' recorded fingerprint. An input may be a plain Hugging Face
    directory (hf_interop): then ``base`` is required, the input is checked
    against it (plain_inputs.check_against_base), its task comes from
    ``task_names`` (one per plain input, in order) or its config's
    finetuning_task, and only methods that need no statistics accept it
    (unless its optimizer.pt supplies them). ``block_entries`` bounds the
    entries per input merged at once (memory, not results: any value gives the
    same bits). Floating tensors are computed in float32 and stored as the
    inputs store them, or as ``out_dtype`` ("fp32", "bf16", "fp16").
    """
    held: dict[str, Tensor] = {}
    with _prepared(inputs, method, options, base, task_names, block_entries, out_dtype) as run:
        report = run.execute(Sink(held.__setitem__), progress)
    return held, report


def merge_checkpoints(inputs: Sequence[InputLike], output: str | Path, *, method: str = DEFAULT_METHOD,
                      options: Mapping[str, Any] | None = None, base: str | None = None,
                      task_names: Sequence[str] | None = None, force: bool = False,
                      progress: Progress | None = None, block_entries: int = BLOCK_ENTRIES,
                      out_dtype: str | None = None, shard_bytes: int | None = None) -> tuple[Checkpoint, MergeReport]:
    """Merge checkpoints into a new checkpoint directory at ``output``, streaming the weights to disk.

    Everything that can be checked is checked before the output is begun (the
    inputs, their statistics, the base and its fingerprint). Then each merged
    tensor goes to its place in the output file (or shard, with
    ``shard_bytes``; umtam.shards) as soon as it is made, so the merged model
    is never held in memory. config.json and tokenizer files are copied and a
    config.<task>.json is written per classification task
    (hf_interop.merged_companion_files), so transformers loads the encoder with
    any one head, and a README.md model card names the method, inputs and
    options; the output carries no statistics. The sidecar has kind "merge",
    the union of the input tasks (each keeping its expert's metrics as
    "expert_metrics"), the shared base and the lineage: inputs with the sha256
    of their weights, method, options.
    """
    from umtam.merge.card import model_card
    from umtam.shards import WeightsWriter

    checkpoints = _as_checkpoints(inputs, task_names)
    check_output_dir(output, inputs=[c.path for c in checkpoints], force=force)
    # companion files first: a --base tokenizer link that is refused is refused before the work
    tasks = {task: record.as_json() for checkpoint in checkpoints for task, record in checkpoint.tasks.items()}
    companions = merged_companion_files(checkpoints, tasks, base, out_dtype)
    reports: list[MergeReport] = []
    with _prepared(checkpoints, method, options, base, None, block_entries, out_dtype) as run:
        def write_weights(staging: Path) -> dict[str, str]:
            sink = Sink(open_writer=lambda entries: WeightsWriter(staging, entries, shard_bytes))
            reports.append(run.execute(sink, progress))
            return sink.digests  # hashed as written: write_checkpoint need not read them again

        written = write_checkpoint(
            output, tensors=write_weights, sidecar=lambda: reports[0].sidecar, force=force, inputs=checkpoints,
            extra_files={**companions, "README.md": lambda: model_card(reports[0].sidecar, out_dtype=out_dtype)})
    return written, reports[0]


@contextlib.contextmanager
def _prepared(inputs, method, options, base, task_names, block_entries: int, out_dtype: str | None):
    """A merge with every input, statistic and the base checked and opened, ready to ``execute``."""
    if isinstance(block_entries, bool) or not isinstance(block_entries, int) or block_entries < 1:
        raise ConfigError(f"block_entries must be a positive integer, got {block_entries!r}")
    target = torch_dtype(out_dtype)
    spec, resolved, checkpoints = _prepare(inputs, method, options, base, task_names)
    with open_sources(checkpoints) as sources:
        layout = check_compatible(sources)
        check_dtype_kinds(sources, layout)
        check_stats(spec, resolved, sources, layout)
        merge_plan = make_plan(spec, resolved, sources, layout, block_entries)
        pages = MappedPages()
        base_record, base_tensors = load_base(spec, resolved, sources, layout, base, pages)
        base_checks = check_against_base(sources, layout, base_tensors, pages)
        stream = _Stream(spec, resolved, sources, layout, base_tensors, pages, block_entries,
                         describe_base(base_record, base), target)
        yield _Run(stream, merge_plan, base_record, base_checks, out_dtype)


@dataclass
class _Run:
    stream: Any  # _Stream
    plan: MergePlan
    base_record: dict[str, Any]
    base_checks: dict[str, float]
    out_dtype: str | None

    def execute(self, sink: Sink, progress: Progress | None) -> MergeReport:
        """Every pass, each output tensor handed to ``sink`` as it is made; the report with the sidecar."""
        stream = self.stream
        spec, options, layout, sources = stream.spec, stream.options, stream.layout, stream.sources
        steps = ProgressSteps(progress, self.plan.progress_steps)
        sink.open(output_entries(sources, layout, stream.target))
        cuts = None
        try:
            with one_torch_thread():
                if spec.uses_global_trim(options) and layout.method_keys():
                    cuts = _global_cuts(stream, steps)
                _merge_encoder(stream, cuts, steps, sink)
            _collect_heads(stream, sink)
            sink.close()
        finally:
            sink.abort()
        thresholds = None if cuts is None else {s.task_id: cut.threshold for s, cut in zip(sources, cuts)}
        for source in sources:
            source.checkpoint.settle()  # the lineage records each input's sha256: the hashes must be in
        base_record = dict(self.base_record)
        if isinstance(base_record["fingerprint"], Future):  # a plain input's base, hashed in the background
            base_record["fingerprint"] = base_record["fingerprint"].result()
        sidecar = merged_sidecar(spec, options, sources, thresholds, base_record, self.base_checks)
        if self.out_dtype is not None:
            sidecar["lineage"]["out_dtype"] = self.out_dtype
        return MergeReport(self.plan, thresholds, sidecar)


# ----------------------------------------------------------------------------- inputs and base


def _prepare(inputs, method, options, base, task_names) -> tuple[MergeMethod, dict[str, Any], list[Checkpoint]]:
    spec = get_method(method)
    resolved = spec.resolve_options(options)
    checkpoints = _as_checkpoints(inputs, task_names)
    check_plain_inputs(spec, resolved, checkpoints, base)
    return spec, resolved, checkpoints


def _as_checkpoints(inputs: Sequence[InputLike], task_names: Sequence[str] | None = None) -> list[Checkpoint]:
    if isinstance(inputs, (str, Path, Checkpoint)) or len(inputs) < 2:
        count = 1 if isinstance(inputs, (str, Path, Checkpoint)) else len(inputs)
        raise ConfigError(f"merge needs at least 2 checkpoints, got {count}")
    return open_inputs(inputs, task_names, hash_later=True)  # a plain input's files hash beside the work


# ----------------------------------------------------------------------------- streaming passes


class _Stream:
    """The method tensors of every input, served row block by row block to each pass."""

    def __init__(self, spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[Source],
                 layout: Layout, base: Mapping[str, Tensor] | None, pages: MappedPages, block_entries: int,
                 base_label: str = "the base model", target=None):
        self.spec, self.options, self.sources, self.layout = spec, options, sources, layout
        self.base, self.pages, self.block_entries = base, pages, block_entries
        self.stats = tuple(source.stats for source in sources)
        self.labels = tuple(source.label for source in sources)
        self.task_ids = tuple(source.task_id for source in sources)
        self.base_label = base_label
        self.target = target  # the output's floating dtype (--out-dtype), or None: each input's own
        self.checked: set[str] = set()  # tensors whose rows a pass has read (and checked finite) in full

    def blocks(self, key: str):
        return row_blocks(self.layout.shapes[key], self.block_entries)

    def groups(self, key: str, selections: Sequence[Selection] | None = None,
               streams: tuple[torch.Generator, ...] | None = None) -> Iterator[TensorGroup]:
        """The groups of ``key`` in row order; each block's mapped pages are handed back after use.

        The first pass to read a tensor checks its rows finite (inputs and base)
        as it goes; later passes read the same bytes and skip the check.
        """
        weights = [source.tensor(key) for source in self.sources]
        base = None if self.base is None else self.base[key]
        # a method whose output check covers its inputs has them checked in merge(), once merged
        check = key not in self.checked and not self.spec.output_checks_inputs
        for block in self.blocks(key):
            rows = row_slice(block)
            group = TensorGroup(
                name=key,
                weights=tuple(weight[rows] for weight in weights),
                base=None if base is None else base[rows],
                stats=self.stats,
                labels=self.labels,
                task_ids=self.task_ids,
                thresholds=None if selections is None else tuple(selections),
                block=block,
                streams=streams,
            )
            if check:
                self.check_rows(group)
            yield group
            self.pages.release(*group.weights, group.base)
        self.checked.add(key)

    def check_rows(self, group: TensorGroup) -> None:
        for weight, label in zip(group.weights, self.labels):
            check_finite(weight, tensor_name=group.name, owner=label, block=group.block)
        if group.base is not None:
            check_finite(group.base, tensor_name=group.name, owner=self.base_label, block=group.block)

    def out_dtype(self, stored):
        """The dtype a floating tensor stored as ``stored`` is written in."""
        return stored if self.target is None or not stored.is_floating_point else self.target

    def release_files(self, key: str) -> None:
        """Hand back every mapped page of the inputs (and base) that hold ``key``."""
        self.pages.release_files(*(source.tensor(key) for source in self.sources),
                                 None if self.base is None else self.base[key])

    def trim_scores(self, key: str) -> Iterator[Tensor]:
        for group in self.groups(key):
            yield self.spec.trim_scores(group, self.options)

    def merge(self, key: str, selections: Sequence[Selection] | None) -> Tensor:
        """The merged tensor ``key``, built block by block, each block checked finite once cast."""
        spec, options = self.spec, self.options
        blocks = self.blocks(key)
        if selections is None and spec.trim_scores is not None and len(blocks) > 1:
            # A per-tensor trim needs the whole tensor's exact cuts before any block; the
            # blocks then use up each cut's tie allowance in row order, as the whole tensor would.
            cuts = streaming_cuts(lambda: self.trim_scores(key), options["keep"])
            selections = tuple(Selection(cut) for cut in cuts)
        streams = None
        if spec.random_streams is not None and len(blocks) > 1:
            streams = spec.random_streams(key, self.task_ids, options)
        # Allocated before the block's temporaries, so that those are freed from the top
        # of the heap and the held outputs do not pin holes between them.
        merged = torch.empty(self.layout.shapes[key], dtype=self.out_dtype(self.sources[0].tensor(key).dtype))
        for group, block in zip(self.groups(key, selections, streams), blocks):
            rows = merged if block is None else merged[block.start:block.stop]
            rows.copy_(spec.merge(group, options))
            if not all_finite(rows):
                self.check_rows(group)  # an input's NaN is named as the input's, not as an overflow
                self.check_output(key, rows, block)
        return merged

    def check_output(self, key: str, rows: Tensor, block: RowBlock | None = None) -> None:
        """Refuse NaN or inf in merged rows (in the output dtype), naming the tensor, the method and its options.

        The inputs are finite by now, so only the method's arithmetic (or the cast
        to a narrower output dtype) can have overflowed.
        """
        if all_finite(rows):
            return
        raise MergeError(
            f"merge method {self.spec.name} with {describe_options(self.spec, self.options)} gives NaN or "
            f"infinite values in tensor {key!r} ({non_finite_where(rows, block)})",
            hint=f"every input is finite, so the merged values overflowed {dtype_name(rows.dtype)}; "
                 "nothing was written; use smaller options (e.g. lambda)",
        )


def describe_options(spec: MergeMethod, options: Mapping[str, Any]) -> str:
    """The options that differ from the method's defaults, as "lambda=1e+308" (or "its default options")."""
    defaults = spec.resolve_options()
    changed = [f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"
               for key, value in options.items() if defaults.get(key) != value]
    return ", ".join(changed) if changed else "its default options"


def _global_cuts(stream: _Stream, steps: ProgressSteps) -> list[Cut]:
    """Each input's exact trim cut over all its 2-D weights (two streaming passes)."""

    def batches():
        for key in stream.layout.method_keys():
            yield from stream.trim_scores(key)
            stream.release_files(key)
            steps.advance(f"prepare {key}")

    return streaming_cuts(batches, stream.options["keep"])


def _merge_encoder(stream: _Stream, cuts: Sequence[Cut] | None, steps: ProgressSteps, sink: Sink) -> None:
    """Every shared tensor, merged (or copied) and handed to ``sink`` at once: nothing merged is kept here."""
    layout, sources = stream.layout, stream.sources
    method_keys = set(layout.method_keys())
    vector_keys = set(layout.vector_keys())
    # A global cut's tie allowance is spent across the tensors in name order (layout.keys is sorted).
    selections = None if cuts is None else tuple(Selection(cut) for cut in cuts)

    def make(key: str) -> Tensor:
        if key in method_keys:
            return stream.merge(key, selections)
        if key in vector_keys:
            return _merge_vector(key, stream)
        return sources[0].tensor(key)  # integer buffers: nothing to merge

    workers = 1 if selections is not None else MERGE_WORKERS
    for key, merged in in_order(make, layout.keys, workers):
        sink.put(key, merged)
        stream.release_files(key)
        steps.advance(key)


def _merge_vector(key: str, stream: _Stream) -> Tensor:
    """1-D parameters follow the ``norms`` option, whatever the method; what it reads is checked finite."""
    weights = [source.tensor(key) for source in stream.sources]
    out = stream.out_dtype(weights[0].dtype)
    if stream.options["norms"] == "base":
        check_finite(stream.base[key], tensor_name=key, owner=stream.base_label)
        merged = stream.base[key].to(out, copy=True)
    else:
        for weight, label in zip(weights, stream.labels):
            check_finite(weight, tensor_name=key, owner=label)
        merged = torch.stack([w.to(torch.float32) for w in weights]).mean(dim=0).to(out)
    stream.check_output(key, merged)  # a mean, or a cast to a narrower dtype, can overflow
    return merged


def _collect_heads(stream: _Stream, sink: Sink) -> None:
    """Every input's own head, under heads/<task>/<key>, checked finite: heads are never averaged."""
    for source in stream.sources:
        for out_key, in_key in source.heads.items():
            head = source.tensor(in_key)
            check_finite(head, tensor_name=in_key, owner=source.label)
            head = head.to(stream.out_dtype(head.dtype))
            stream.check_output(out_key, head)  # --out-dtype fp16 may not hold it
            sink.put(out_key, head)
