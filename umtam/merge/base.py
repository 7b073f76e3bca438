"""What a merge method is: a pure function over one tensor group, plus its options.

The engine (engine.py) owns every file; a method only sees a ``TensorGroup``
(the K inputs' values of one tensor, the base value, each input's statistics)
and returns the merged tensor. That keeps methods small, testable on
hand-computed 3x4 tensors, and free of I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from umtam.errors import ConfigError
from umtam.saliency import available_scores, unknown_choice_message


@dataclass(frozen=True)
class TensorGroup:
    """One tensor of every input: W_t for t = 1..K, the base W0, and per-input statistics.

    ``labels`` name the inputs in error messages (checkpoint paths); ``task_ids``
    identify them stably (their task names) so that seeded methods do not depend
    on input order. ``thresholds`` carries per-input global trim thresholds from
    the engine's prepare pass (None: the method trims per tensor).
    """

    name: str
    weights: tuple[Tensor, ...]
    base: Tensor | None = None
    stats: tuple[Mapping[str, Tensor], ...] = ()
    labels: tuple[str, ...] = ()
    task_ids: tuple[str, ...] = ()
    thresholds: tuple[float, ...] | None = None

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
        return self.weights[0].shape

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
        return self.stacked - self.base32


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
    "norms": Option(
        "average",
        one_of(*NORMS_CHOICES),
        "1-D parameters (biases, LayerNorm): 'average' the inputs or keep the 'base' W0 "
        "(provisional default 'average')",
    ),
}


# ----------------------------------------------------------------------------- methods


MergeFn = Callable[[TensorGroup, Mapping[str, Any]], Tensor]
ScoresFn = Callable[[TensorGroup, Mapping[str, Any]], Tensor]  # (K, *shape) trim scores


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``merge`` returns the merged weights of one tensor group. ``trim_scores``,
    when set, gives each input's trim scores for one group; with option
    ``scope == "global"`` the engine runs them in a prepare pass over every 2-D
    tensor and hands the exact per-input thresholds to ``merge``.
    ``stats_needed(options)`` names the saliency scores whose statistics must be
    present, so a missing statistic is reported before any work.
    """

    name: str
    merge: MergeFn
    url: str
    summary: str
    options: Mapping[str, Option] = field(default_factory=dict)
    needs_base: bool = True
    trim_scores: ScoresFn | None = None
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
