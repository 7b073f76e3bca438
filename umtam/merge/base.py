"""What a merge method is: a pure function over one tensor group, plus its options, declared once.

The engine (engine.py) owns every file; a method only sees a ``TensorGroup``
(group.py: the K inputs' values of one tensor, the base value, each input's
statistics) and returns the merged tensor. That keeps methods small, testable
on hand-computed 3x4 tensors, and free of I/O.

A method's options are a schema (``MethodOptions``, umtam.config): each field
with its default, range and help in one place; ``umtam merge --help`` and the
command-line flags are generated from them, recipes load through them and the
sidecar's lineage records them. Every method also takes the engine's ``norms``.

Nothing here, and nothing at the top of a method's module, imports torch:
methods import it (and ``ops``) inside their functions, so the command line
can read every method's options without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Mapping, Sequence

from pydantic import ValidationError

from umtam.config.schema import Schema, describe_errors, option, registered
from umtam.errors import ConfigError
from umtam.registry import did_you_mean
from umtam.scores import SCORES

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from umtam.merge.group import TensorGroup


class MethodOptions(Schema):
    """Options every method takes: the engine applies them outside the method."""

    # 'base' is the default because it scored higher on the experts' unseen holdout
    # slice for umtam (+0.23 points) and ties (+0.59), the trimming methods, and lost
    # only for task-arithmetic (-0.21): bench/results/merges/norms/, README "Results".
    norms: Literal["base", "average"] = option(
        "base", help="1-D parameters (biases, LayerNorm): keep the 'base' W0 or 'average' the inputs.")


MergeFn = Callable[["TensorGroup", Mapping[str, Any]], "Tensor"]
ScoresFn = Callable[["TensorGroup", Mapping[str, Any]], "Tensor"]  # (K, *shape) trim scores
# (tensor name, task ids, options) -> one generator per input, at the tensor's first entry
StreamsFn = Callable[[str, Sequence[str], Mapping[str, Any]], "tuple[torch.Generator, ...]"]


def _no_stats(options: Mapping[str, Any]) -> tuple[str, ...]:
    return ()


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

    ``output_checks_inputs`` declares that every input entry (and the base's)
    reaches its merged entry through sums and scalings alone, with no
    comparison that could drop it, so a NaN or inf anywhere in the inputs makes
    the merged rows non-finite: the engine then checks only the merged rows and
    reads the inputs' for the culprit when those fail (one finiteness check
    per block instead of K + 2).
    """

    name: str
    merge: MergeFn
    url: str
    summary: str
    options: type[MethodOptions] = MethodOptions
    needs_base: bool = True
    trim_scores: ScoresFn | None = None
    random_streams: StreamsFn | None = None
    stats_needed: Callable[[Mapping[str, Any]], tuple[str, ...]] = _no_stats
    output_checks_inputs: bool = False

    def resolve_options(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options with defaults filled in, keyed as recorded ("lambda"); every problem reported at once."""
        infos = self.options.options()
        keys = {info.key: name for name, info in infos.items()} | {name: name for name in infos}
        given = {str(key).replace("-", "_") if str(key).replace("-", "_") in keys else key: value
                 for key, value in (given or {}).items()}
        problems = [f"unknown option {key!r} for merge method {self.name} (it takes "
                    f"{', '.join(sorted(info.key for info in infos.values()))}){did_you_mean(key, list(keys))}"
                    for key in given if key not in keys]
        try:
            resolved = self.options.model_validate({key: value for key, value in given.items() if key in keys})
        except ValidationError as exc:
            problems.extend(describe_errors(exc, self.options, owner=self.name))
            resolved = None
        if problems:
            raise ConfigError("; ".join(problems))
        return resolved.model_dump(by_alias=True)

    def uses_global_trim(self, options: Mapping[str, Any]) -> bool:
        return self.trim_scores is not None and options.get("scope") == "global"


# Field types shared by several methods' options.
Scope = Literal["tensor", "global"]
Aggregation = Literal["mean", "sum"]
ScoreName = Annotated[str, registered(SCORES)]


def keep_option(default: float) -> Any:
    return option(default, gt=0, le=1, help="Fraction of each task's entries the trim keeps.")


def lambda_option() -> Any:
    return option(1.0, alias="lambda", help="Scale of the merged task vector.")


def scope_option(default: str) -> Any:
    return option(default, help="Trim per tensor, or over all 2-D weights at once.")
