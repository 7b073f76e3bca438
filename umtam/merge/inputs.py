"""The merge's inputs, opened and checked: memory-mapped weights, lazily read statistics, one layout.

Every input's weights (model.safetensors or its shards) and stats.safetensors are memory-mapped
(umtam.safetensors_io); nothing is read until a tensor is asked for. Before
any work the inputs must agree: one base fingerprint (plain Hugging Face
inputs record none and are checked against --base instead, plain_inputs.py),
the same encoder keys and shapes, distinct tasks, and every statistic the
method will read.

Inputs must not change while they are read: the lineage records the sha256
each file had when it was loaded. Every tensor read first checks that its file
still has the identity it had when hashed (``Checkpoint.check_unchanged``, a
stat), and ``open_sources`` checks every input once more when the merge is
done, so a file rewritten in place or truncated is a one-line CheckpointError,
not an output recorded against the old file. What remains: a file truncated
between that stat and the read of the pages it removed kills the process with
SIGBUS (memory-mapped reads cannot raise), and a rewrite that restores size,
mtime and inode goes unseen.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from umtam.base_model import dtype_kind
from umtam.checkpoint import STATS_FILE, Checkpoint
from umtam.errors import CheckpointError, MergeError
from umtam.families import family_of_dir
from umtam.heads import check_head_labels, head_key, split_head_key
from umtam.safetensors_io import FLOAT_DTYPES, open_safetensors
from umtam.shards import open_weights
from umtam.saliency import missing_stat_error
from umtam.scores import required_stats

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.base import MergeMethod

_STATS_HINT = (
    "checkpoints from `umtam train` carry it (every optimizer records curvature); otherwise "
    "choose a method that needs no statistics (average, task-arithmetic, ties, dare, dare-ties) "
    "or umtam with trim=magnitude weights=uniform"
)


class LazyStats(Mapping):
    """A checkpoint's statistics, read one tensor at a time from the memory-mapped file.

    The last few are kept: every row block of a tensor reads the same R and C.
    The engine's merge threads share it, so the kept ones change under a lock.
    """

    _RECENT = 8

    def __init__(self, handle: Any | None, check: Callable[[], None] = lambda: None):
        self._handle = handle
        self._check = check  # raises if the file changed since it was hashed
        self._keys = frozenset(handle.keys()) if handle is not None else frozenset()
        self._recent: dict[str, Tensor] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with self._lock:
            if key not in self._recent:
                if len(self._recent) >= self._RECENT:
                    del self._recent[next(iter(self._recent))]
                self._check()
                self._recent[key] = self._handle.get_tensor(key)
            return self._recent[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class Source:
    """One opened input: its checkpoint, mapped weights and statistics, and where its heads go."""

    checkpoint: Checkpoint
    model: Any  # umtam.shards.ShardedHandle: one file or every shard
    stats: Mapping[str, Any]  # LazyStats, or a plain input's imported statistics
    label: str
    task_id: str
    encoder_keys: frozenset[str]
    heads: dict[str, str]  # output key -> key in this input

    @property
    def plain(self) -> bool:
        """A plain Hugging Face directory: no statistics, no recorded base."""
        return self.checkpoint.is_plain

    def tensor(self, key: str) -> Tensor:
        """The mapped tensor ``key``, after checking the file is still the one hashed (see the module docstring)."""
        self.checkpoint.check_unchanged(self.model.file_of(key))
        return self.model.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.model.get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self.model.get_slice(key).get_dtype()


@dataclass(frozen=True)
class Layout:
    keys: tuple[str, ...]  # encoder keys, sorted
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    def method_keys(self) -> tuple[str, ...]:
        """2-D and higher floating weights: what the method merges."""
        return tuple(k for k in self.keys if self.dtypes[k] in FLOAT_DTYPES and len(self.shapes[k]) >= 2)

    def vector_keys(self) -> tuple[str, ...]:
        """1-D floating parameters (biases, LayerNorm): what option ``norms`` decides."""
        return tuple(k for k in self.keys if self.dtypes[k] in FLOAT_DTYPES and len(self.shapes[k]) < 2)


@contextlib.contextmanager
def open_sources(checkpoints: Sequence[Checkpoint]) -> Iterator[list[Source]]:
    """The inputs, mapped; when the body is done, every input file is checked unchanged since it was hashed."""
    with contextlib.ExitStack() as stack:
        sources = []
        for checkpoint in checkpoints:
            checkpoint.check_unchanged()  # what is mapped now is what was hashed
            model = stack.enter_context(open_weights(checkpoint.path))
            stats_file = checkpoint.stats_file
            stats = stack.enter_context(open_safetensors(stats_file)) if stats_file else None
            check = functools.partial(checkpoint.check_unchanged, STATS_FILE)
            imported = checkpoint.imported_stats  # a plain input's optimizer.pt (umtam.adam_import)
            sources.append(_describe(checkpoint, model, imported if imported is not None else LazyStats(stats, check)))
        yield sources
        for checkpoint in checkpoints:
            checkpoint.check_unchanged()


def _describe(checkpoint: Checkpoint, model: Any, stats: LazyStats) -> Source:
    family = family_of_dir(checkpoint.path)
    check_head_labels(checkpoint, {key: tuple(model.get_slice(key).get_shape()) for key in model.keys()}, family)
    encoder, heads = set(), {}
    for key in model.keys():
        if split_head_key(key) is not None:
            heads[key] = key  # a merged input's heads keep their task
        elif family.is_head_key(key):
            heads[head_key(_single_task(checkpoint, key), key)] = key
        else:
            encoder.add(key)
    return Source(checkpoint, model, stats, str(checkpoint.path), "+".join(sorted(checkpoint.tasks)),
                  frozenset(encoder), heads)


def _single_task(checkpoint: Checkpoint, key: str) -> str:
    tasks = list(checkpoint.tasks)
    if len(tasks) != 1:
        raise MergeError(
            f"{checkpoint.path}: head tensor {key!r} belongs to no single task (tasks: {', '.join(tasks)})",
            hint="a checkpoint with several tasks must store its heads as heads/<task>/<key>",
        )
    return tasks[0]


def check_compatible(sources: Sequence[Source]) -> Layout:
    """One base, one architecture, distinct tasks: the layout every input shares."""
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
    return Layout(keys, shapes, dtypes)


def _check_same_base(first: Source, other: Source) -> None:
    a, b = first.checkpoint.base_fingerprint, other.checkpoint.base_fingerprint
    if a != b:
        raise MergeError(
            f"{first.label} and {other.label} were fine-tuned from different base models "
            f"(fingerprints {a[:12]}... and {b[:12]}...)",
            hint="merge only checkpoints trained from the same base weights",
        )


def _check_same_keys(first: Source, other: Source) -> None:
    difference = sorted(first.encoder_keys ^ other.encoder_keys)
    if difference:
        key = difference[0]
        has, lacks = (first, other) if key in first.encoder_keys else (other, first)
        raise MergeError(
            f"tensor {key!r} is in {has.label} but not in {lacks.label} "
            f"({len(difference)} encoder key(s) differ)",
            hint="checkpoints of different architectures cannot be merged",
        )


def _check_distinct_tasks(sources: Sequence[Source]) -> None:
    owner: dict[str, Source] = {}
    for source in sources:
        for task in source.checkpoint.tasks:
            if task in owner:
                raise MergeError(
                    f"task {task!r} is in both {owner[task].label} and {source.label}",
                    hint="merge one expert per task; each task keeps its own head",
                )
            owner[task] = source


def check_stats(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[Source], layout: Layout) -> None:
    """Report a missing statistic before any work, naming the checkpoint and the key."""
    for score_name in spec.stats_needed(options):
        for key in layout.method_keys():
            for stat_key in required_stats(score_name, key, len(layout.shapes[key])):
                for source in sources:
                    if stat_key not in source.stats:
                        error = missing_stat_error(source.label, stat_key, source.stats)
                        raise CheckpointError(f"{error.message} (needed by merge method {spec.name})",
                                              hint=_STATS_HINT)


def check_dtype_kinds(sources: Sequence[Source], layout: Layout) -> None:
    """Every input's tensor has the first input's kind of dtype, and floating weights are ones merge reads.

    The layout (which tensors the method merges, which are copied from the
    first input) comes from the first input's headers, so an integer weight in
    any input would otherwise be copied through or silently cast to float.
    """
    first = sources[0]
    for key in layout.keys:
        kind = dtype_kind(layout.dtypes[key])
        if kind == "floating" and layout.dtypes[key] not in FLOAT_DTYPES:
            raise MergeError(f"tensor {key!r} is {layout.dtypes[key]} in {first.label}; merge reads "
                             f"{', '.join(FLOAT_DTYPES)} weights", hint="save the weights in one of those dtypes")
        for other in sources[1:]:
            if dtype_kind(other.dtype(key)) != kind:
                raise MergeError(
                    f"tensor {key!r} is {kind} ({layout.dtypes[key]}) in {first.label} "
                    f"but {dtype_kind(other.dtype(key))} ({other.dtype(key)}) in {other.label}",
                    hint="checkpoints of different architectures cannot be merged",
                )
