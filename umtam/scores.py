"""The saliency scores by name, and the statistics each reads: no torch, so the CLI can list them.

    curvature       T^2 * sqrt(R_i C_j)        row/column means of G^2 (DESIGN section 4)
    magnitude       T^2                        no statistics needed
    fisher          T^2 * F                    full diagonal "fisher/<name>", when recorded
                                               (train --track-fisher, or an imported Adam state)
    trajectory      EMA_t (T_t G_t)^2          "trajectory/<name>", when recorded (--track-trajectory)
    second-moment   T^2 * R_i C_j / mean(R)    Adafactor's rank-1 second moment; the
                                               Fast Fisher Grafting score of OTA merging
    curvature-tensor  curvature / its tensor's mean: magnitude decides across tensors
    curvature-row     T^2 * sqrt(C_j) / mean(sqrt C): curvature / its row's mean (the default)

The functions live in umtam.saliency under the name each spec gives; adding a
score is one function there plus its registration here. Statistics keys are
``<stat>/<parameter name>``: a 2-D weight has ``exp_avg_sq_row/<name>`` (length
m) and ``exp_avg_sq_col/<name>`` (length n), a 1-D parameter
``exp_avg_sq/<name>``, a full diagonal ``fisher/<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from umtam.registry import Registry


def row_key(name: str) -> str:
    return f"exp_avg_sq_row/{name}"


def col_key(name: str) -> str:
    return f"exp_avg_sq_col/{name}"


def vector_key(name: str) -> str:
    return f"exp_avg_sq/{name}"


def fisher_key(name: str) -> str:
    return f"fisher/{name}"


def second_moment_keys(name: str, ndim: int) -> tuple[str, ...]:
    return (row_key(name), col_key(name)) if ndim >= 2 else (vector_key(name),)


def no_stats(name: str, ndim: int) -> tuple[str, ...]:
    return ()


def fisher_keys(name: str, ndim: int) -> tuple[str, ...]:
    return (fisher_key(name),)


def trajectory_key(name: str) -> str:
    return f"trajectory/{name}"


def trajectory_keys(name: str, ndim: int) -> tuple[str, ...]:
    return (trajectory_key(name),)


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    function: str  # the score function's name in umtam.saliency
    needs: Callable[[str, int], tuple[str, ...]]  # (parameter name, ndim) -> statistics keys it reads
    summary: str


SCORES: Registry[ScoreSpec] = Registry("saliency score")

# What `umtam prune` ranks by, and so what `umtam inspect --saliency` shows first. curvature-row, not
# DESIGN's curvature: on the 50-cell, three-seed saliency study (README) the raw score hands a global cut
# to the layers with the largest gradients; the row-normalised one was chosen on the holdout slice and
# ties magnitude where curvature lost to it.
DEFAULT_SCORE = "curvature-row"
# What `umtam inspect --saliency` maps unless told: what prune keeps, beside the TIES trim's magnitude.
INSPECT_SCORES = (DEFAULT_SCORE, "magnitude")

for _spec in (
    ScoreSpec("curvature", "curvature_score", second_moment_keys, "T^2 sqrt(R_i C_j): DESIGN section 4"),
    ScoreSpec("fisher", "fisher_score", fisher_keys, "T^2 F, the full Fisher diagonal, when recorded (train --track-fisher)"),
    ScoreSpec("magnitude", "magnitude_score", no_stats, "T^2, as the TIES trim ranks"),
    ScoreSpec("second-moment", "second_moment_score", second_moment_keys,
              "T^2 R_i C_j / mean(R): Fast Fisher Grafting on compressed moments"),
    ScoreSpec("trajectory", "trajectory_score", trajectory_keys,
              "EMA over training of ((W_t - W0) G_t)^2, when recorded (train --track-trajectory)"),
    ScoreSpec("curvature-tensor", "tensor_curvature_score", second_moment_keys,
              "curvature over its tensor's mean: within-tensor curvature, across-tensor magnitude"),
    ScoreSpec("curvature-row", "row_curvature_score", second_moment_keys,
              "T^2 sqrt(C_j) / mean(sqrt C): curvature over its row's mean"),
):
    SCORES.register(_spec)


def required_stats(score: str, name: str, ndim: int) -> tuple[str, ...]:
    """The statistics keys ``score`` reads for parameter ``name`` (to check before long work)."""
    return SCORES.get(score).needs(name, ndim)


def reads_statistics(score: str) -> bool:
    """Whether a score needs training statistics at all (magnitude does not)."""
    return bool(required_stats(score, "weight", 2))
