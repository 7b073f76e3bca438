"""What a merge method is: a pure function over one tensor group, plus its options.

The engine (engine.py) owns every file; a method only sees a ``TensorGroup``
(the K inputs' values of one tensor, the base value, each input's statistics)
and returns the merged tensor. That keeps methods small, testable on
hand-computed 3x4 tensors, and free of I/O.

A group may also be a row block of a tensor (``group.block``): every method is
elementwise across the K inputs once its per-tensor quantities are fixed, so
the engine merges a large tensor a few rows at a time. Per-tensor quantities
are then passed in (trim thresholds) or derived from the whole tensor's
statistics (curvature means, mean(R)), never from the block's own entries, and
the rows merged in blocks equal the rows of the whole-tensor merge bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from umtam.errors import ConfigError
from umtam.saliency import RowBlock, available_scores, unknown_choice_message, whole_shape


@dataclass(frozen=True)
class TensorGroup:
    """One tensor of every input: W_t for t = 1..K, the base W0, and per-input statistics.

    ``labels`` name the inputs in error messages (checkpoint paths); ``task_ids``
    identify them stably (their task names) so that seeded methods do not depend
    on input order. ``thresholds`` carries per-input trim thresholds from the
    engine: global ones from its prepare pass, or this tensor's own when the
    engine splits it into row blocks (None: the method trims per tensor itself).

    ``block`` says which rows of the whole tensor the weights hold (None: all of
    them); statistics are always the whole tensor's. ``streams`` are per-input
    random generators positioned at this block's first entry, shared by the
    blocks of one tensor in row order (None: a seeded method starts its own at
    the tensor's first entry).
    """

    name: str
    weights: tuple[Tensor, ...]
    base: Tensor | None = None
    stats: tuple[Mapping[str, Tensor], ...] = ()
    labels: tuple[str, ...] = ()
    task_ids: tuple[str, ...] = ()
    thresholds: tuple[float, ...] | None = None
    block: RowBlock | None = None
    streams: tuple[torch.Generator, ...] | None = None

    def __post_init__(self):
        count = len(self.weights)
        if not self.stats:
            object.__setattr__(self, "stats", tuple({} for _ in range(count)))
        if not self.labels:
            object.__setattr__(self, "labels", tuple(f"input {i + 1}" for i in range(count)))
        if not self.task_ids:
            object.__setattr__(self, "task_ids", tuple(str(i) for i in range(count)))

    @property
    def size(self) -> int:
        return len(self.weights)

    @property
    def shape(self) -> torch.Size:
        """The shape of the weights held: the row block's, or the whole tensor's."""
        return self.weights[0].shape

    @property
    def tensor_shape(self) -> torch.Size:
        """The whole tensor's shape, also for a row block."""
        return whole_shape(self.shape, self.block)

    @cached_property
    def stacked(self) -> Tensor:
        """W_t stacked on a new leading axis, in float32."""
        return torch.stack([w.to(torch.float32) for w in self.weights])

    @cached_property
    def base32(self) -> Tensor:
        if self.base is None:
            raise ValueError(f"{self.name}: this method needs the base weights W0")
        return self.base.to(torch.float32)

    @cached_property
    def task_vectors(self) -> Tensor:
        """T_t = W_t - W0, stacked (K, *shape)."""
        # Each difference written straight into its slot: one pass, one (K, *shape) buffer.
        vectors = torch.empty((self.size, *self.shape), dtype=torch.float32)
        for slot, weight in zip(vectors, self.weights):
            torch.sub(weight.to(torch.float32), self.base32, out=slot)
        return vectors


# ----------------------------------------------------------------------------- options


Check = Callable[[Any], "str | None"]  # returns what is wrong, or None


@dataclass(frozen=True)
class Option:
    default: Any
    check: Check
    help: str


def fraction(value: Any) -> str | None:
    if _is_number(value) and 0 < value <= 1:
        return None
    return "must be a fraction in (0, 1]"


def probability_below_one(value: Any) -> str | None:
    if _is_number(value) and 0 <= value < 1:
        return None
    return "must be in [0, 1)"


def finite_number(value: Any) -> str | None:
    return None if _is_number(value) and math.isfinite(value) else "must be a finite number"


def positive_number(value: Any) -> str | None:
    return None if _is_number(value) and math.isfinite(value) and value > 0 else "must be a positive number"


def non_negative_number(value: Any) -> str | None:
    return None if _is_number(value) and math.isfinite(value) and value >= 0 else "must be >= 0"


def integer(value: Any) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def saliency_name(value: Any) -> str | None:
    choices = available_scores()
    return None if value in choices else f"must be one of {', '.join(choices)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Every method accepts these: the engine applies them outside the method.
NORMS_CHOICES = ("average", "base")
COMMON_OPTIONS: Mapping[str, Option] = {
    # 'base' is the default because it scored higher on the experts' unseen holdout
    # slice for umtam (+0.23 points) and ties (+0.59), the trimming methods, and lost
    # only for task-arithmetic (-0.21): bench/results/merges/norms/, README "Results".
    "norms": Option(
        "base",
        one_of(*NORMS_CHOICES),
        "1-D parameters (biases, LayerNorm): keep the 'base' W0 (default) or 'average' the inputs",
    ),
}


# ----------------------------------------------------------------------------- methods


MergeFn = Callable[[TensorGroup, Mapping[str, Any]], Tensor]
ScoresFn = Callable[[TensorGroup, Mapping[str, Any]], Tensor]  # (K, *shape) trim scores
# (tensor name, task ids, options) -> one generator per input, at the tensor's first entry
StreamsFn = Callable[[str, Sequence[str], Mapping[str, Any]], tuple[torch.Generator, ...]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``merge`` returns the merged weights of one tensor group (or row block).
    ``trim_scores``, when set, gives each input's trim scores for one group,
    ranked with option ``keep``; with option ``scope == "global"`` the engine
    runs them in a prepare pass over every 2-D tensor and hands the exact
    per-input thresholds to ``merge``, and it does the same per tensor for a
    tensor it splits into row blocks, so ``merge`` trims at ``group.thresholds``
    whenever they are given. ``random_streams``, when set, makes the generators
    a seeded method draws from for one tensor; the engine passes them to the
    tensor's row blocks in order (``group.streams``). ``stats_needed(options)``
    names the saliency scores whose statistics must be present, so a missing
    statistic is reported before any work.
    """

    name: str
    merge: MergeFn
    url: str
    summary: str
    options: Mapping[str, Option] = field(default_factory=dict)
    needs_base: bool = True
    trim_scores: ScoresFn | None = None
    random_streams: StreamsFn | None = None
    stats_needed: Callable[[Mapping[str, Any]], tuple[str, ...]] = lambda options: ()

    def all_options(self) -> dict[str, Option]:
        return {**self.options, **COMMON_OPTIONS}

    def resolve_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults filled in; unknown names and bad values reported all at once."""
        known = self.all_options()
        given = dict(given or {})
        problems = [
            unknown_choice_message(f"option for merge method {self.name!r}:", key, sorted(known))
            for key in given if key not in known
        ]
        resolved = {key: given.get(key, option.default) for key, option in known.items()}
        for key, option in known.items():
            problem = option.check(resolved[key]) if key in given else None
            if problem:
                problems.append(f"{self.name} option {key}={resolved[key]!r} {problem}")
        if problems:
            raise ConfigError("; ".join(problems))
        return resolved

    def uses_global_trim(self, options: Mapping[str, Any]) -> bool:
        return self.trim_scores is not None and options.get("scope") == "global"
