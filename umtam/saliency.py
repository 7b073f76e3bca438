"""Saliency: how much each entry of a task vector matters, and where to cut.

A score function maps one parameter's task vector ``T = W - W0`` and its
checkpoint's statistics to a score of the same shape; pruning and merging keep
the highest-scoring entries. Scores are computed when needed, one tensor at a
time, from the factored statistics in stats.safetensors: no dense saliency is
ever stored.

The scores are registered in umtam.scores (curvature, magnitude, fisher,
second-moment: DESIGN section 4), which also names the statistics keys; the
functions are here. Higher-rank weights are read as (shape[0], rest).

Row blocks: every score is elementwise given its statistics, so a weight can be
scored a few rows at a time. ``block=RowBlock(start, stop, rows)`` scores rows
[start, stop) of a weight with ``rows`` rows: the task vector holds those rows
only, the statistics stay the whole weight's (R is sliced, per-tensor
quantities such as mean(R) are taken over all rows), and the result equals
the same rows of the whole weight's scores bit for bit. Means over a whole
weight come from the factors (``curvature_mean``, ``second_moment_mean``), so
no m x n matrix is formed for them either.

Selection: ``keep`` is the fraction of entries to keep, k = ``round(keep * N)``
of them (at least one), and exactly k are kept, also when scores tie. A
``Cut`` says how: the threshold is the exact k-th largest score; every entry
scoring above it is kept, and of the entries scoring exactly the threshold the
first ``ties`` in a fixed order (tensors in name order, entries in row-major
order, so row blocks in row order) are kept, ``ties`` being k minus the count
strictly above. Without this, scores that tie at the threshold (the zero
curvature of rows no gradient reached ties at a threshold of 0) would all be
kept, and ``keep=0.5`` could keep everything. ``Selection`` hands the tie
allowance out as the tensors (or row blocks) come, first come first served.
``tensor_cut`` finds the cut of one tensor; ``streaming_cuts`` the same cut
over many tensors without concatenating them.

Numbers: statistics must be finite, non-negative and not all zero for a whole
tensor (``read_stat``); weights and task vectors must be finite
(``check_finite``); scores must be finite (``score``). Each is checked as the
tensor is read, so nothing silently decides a comparison it should not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from umtam.errors import CheckpointError, ConfigError
from umtam.scores import SCORES, col_key, fisher_key, row_key, trajectory_key, vector_key

ScoreFn = Callable[..., Tensor]

_STATS_HINT = (
    "checkpoints from `umtam train` carry it (every optimizer records curvature); "
    "otherwise use a score that needs no statistics (--score magnitude)"
)


def get_score(name: str) -> ScoreFn:
    """The score function called ``name``; an unknown name lists the choices (umtam.scores)."""
    return globals()[SCORES.get(name).function]


def score(method: str, name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
          checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """Score every entry of one parameter's task vector (or of a row block of it) with the named score."""
    scores = get_score(method)(name, task_vector, stats, checkpoint_label=checkpoint_label, block=block)
    check_scores(scores, score_name=method, tensor_name=name, checkpoint_label=checkpoint_label)
    return scores


def check_scores(scores: Tensor, *, score_name: str, tensor_name: str, checkpoint_label: str) -> None:
    """Scores must be finite: a NaN passes no threshold and an exact top-k would count it all the same.

    With finite weights and statistics a score overflows float32 only where the
    task vector or the statistics pass about 1e19 (T^2 > 3.4e38), and inf
    times a zero curvature is NaN.
    """
    if not all_finite(scores):
        raise CheckpointError(
            f"{checkpoint_label}: the {score_name} saliency of tensor {tensor_name!r} overflows float32 "
            f"in {count_entries(int((~torch.isfinite(scores)).sum()))}",
            hint="its task vector or statistics are far beyond anything fine-tuning gives; the checkpoint is corrupt",
        )


# ----------------------------------------------------------------------------- weights


def check_finite(tensor: Tensor, *, tensor_name: str, owner: str, block: RowBlock | None = None) -> None:
    """Refuse NaN or inf in weights read from ``owner`` (a checkpoint path, or the base model), naming the tensor.

    Called as each tensor (or row block) is read, so a diverged or corrupt input
    is caught without a pass of its own over the whole model. Integer tensors
    cannot hold either and are not read.
    """
    if all_finite(tensor):
        return
    raise CheckpointError(
        f"{owner}: tensor {tensor_name!r} holds NaN or infinite values ({non_finite_where(tensor, block)})",
        hint="it comes from a diverged run or was damaged; use weights saved before that",
    )


def all_finite(tensor: Tensor) -> bool:
    """No NaN or inf in ``tensor`` (integer tensors hold neither).

    Fast path: one float32 (float64 for float64) sum, which any NaN or inf
    turns non-finite; it is 5 to 10 times cheaper than ``isfinite().all()``
    (no mask is built; bf16 measured 1 ms against 10 ms per million entries).
    Only a non-finite sum is checked entry by entry, so a sum of finite values
    that overflows is not mistaken for one.
    """
    if not tensor.is_floating_point():
        return True
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(tensor).all())


def non_finite_where(tensor: Tensor, block: RowBlock | None = None) -> str:
    """Where a message says the NaN and inf are: "3 entries", or "3 entries in rows 16 to 23" of a row block."""
    count = count_entries(int((~torch.isfinite(tensor)).sum()))
    return count if block is None else f"{count} in rows {block.start} to {block.stop - 1}"


def count_entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def task_vector(name: str, weight: Tensor, base: Tensor, *, checkpoint_label: str, base_label: str) -> Tensor:
    """T = W - W0 in float32, refused unless finite, naming the side at fault.

    One check of T covers both sides (NaN or inf in W or W0 leaves T
    non-finite); only when it fails are W and W0 read again to say which.
    """
    vector = weight.to(torch.float32) - base.to(torch.float32)
    if not all_finite(vector):
        check_finite(weight, tensor_name=name, owner=checkpoint_label)
        check_finite(base, tensor_name=name, owner=base_label)
        raise CheckpointError(
            f"{checkpoint_label}: the task vector W - W0 of tensor {name!r} overflows float32",
            hint="the weights are about 1e38 away from the base's: they were not fine-tuned from this base",
        )
    return vector


# ----------------------------------------------------------------------------- statistics


_DENSE_HINTS = {  # per-entry statistics are opt-in at training time
    "fisher": "train with --track-fisher (or import an Adam state) to record it; otherwise use --score curvature",
    "trajectory": "train with --track-trajectory to record it; otherwise use --score curvature",
}


def missing_stat_error(checkpoint_label: str, key: str, stats: Mapping[str, Tensor]) -> CheckpointError:
    where = "its stats.safetensors has no" if len(stats) else "it has no stats.safetensors, so no"
    hint = _DENSE_HINTS.get(key.split("/", 1)[0], _STATS_HINT)
    return CheckpointError(f"{checkpoint_label}: {where} statistic {key!r}", hint=hint)


def read_stat(stats: Mapping[str, Tensor], key: str, *, checkpoint_label: str) -> Tensor:
    """One statistic of one parameter, in float32: finite, non-negative and not all zero, or refused by key.

    Every factor reader (``row_col_factors``, ``full_fisher``, the 1-D
    statistic) reads through here, so the means built from the factors
    (``curvature_mean``, ``second_moment_mean``) are checked too.
    """
    try:
        value = stats[key]
    except KeyError:
        raise missing_stat_error(checkpoint_label, key, stats) from None
    value = value.to(torch.float32)
    # A NaN second moment would silently decide every comparison it enters (it never
    # passes a threshold), so statistics from a diverged run are refused, not used.
    if not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise CheckpointError(f"{checkpoint_label}: statistic {key!r} holds {bad} NaN or infinite value(s)",
                              hint="the run that wrote it diverged; use a state from before it did")
    # An EMA of squared gradients cannot go below zero; the score functions would
    # clamp a negative value to 0 and rank the entry as if no gradient reached it.
    negative = int((value < 0).sum())
    if negative:
        raise CheckpointError(
            f"{checkpoint_label}: statistic {key!r} holds {negative} negative value(s) (as low as "
            f"{float(value.min()):.3g})",
            hint="a mean of squared gradients is never negative: the stats file was damaged or not written by umtam",
        )
    # The EMA of G^2 stays exactly zero for the whole tensor only if no gradient ever
    # reached the parameter (frozen, or unused by the task). Its curvature is then 0
    # everywhere: it cannot rank any entry above another, and a trim over it would
    # keep an arbitrary set (or, weighted by it, the tensor would vanish from a merge).
    if value.numel() and not bool(value.any()):
        raise CheckpointError(
            f"{checkpoint_label}: statistic {key!r} is zero for the whole tensor: no gradient ever reached it, "
            "so it cannot rank the entries",
            hint="the run froze or never used this parameter; use a score that needs no statistics: "
                 "--score magnitude, or merge with trim=magnitude weights=uniform",
        )
    return value


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of a weight that has ``rows`` rows in all, scored on their own."""

    start: int
    stop: int
    rows: int

    def of(self, tensor: Tensor) -> Tensor:
        """These rows of a tensor laid out like the whole weight (or its row factor R)."""
        return tensor[self.start:self.stop]


def whole_shape(shape: Sequence[int], block: RowBlock | None) -> torch.Size:
    """The whole weight's shape, given the shape of one of its row blocks."""
    return torch.Size(shape) if block is None else torch.Size((block.rows, *shape[1:]))


def row_col_factors(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                    checkpoint_label: str, block: RowBlock | None = None) -> tuple[Tensor, Tensor]:
    """R (length shape[0]) and C (length of the rest) for a weight read as 2-D.

    ``shape`` is the shape scored (a row block's with ``block``); R is always the
    whole weight's, so that per-tensor quantities stay per tensor.
    """
    shape = whole_shape(shape, block)
    rows, cols = shape[0], math.prod(shape[1:])
    r = read_stat(stats, row_key(name), checkpoint_label=checkpoint_label).reshape(-1)
    c = read_stat(stats, col_key(name), checkpoint_label=checkpoint_label).reshape(-1)
    if r.numel() != rows or c.numel() != cols:
        raise CheckpointError(
            f"{checkpoint_label}: statistics for {name} have lengths {r.numel()} x {c.numel()}, "
            f"but the weight is {rows} x {cols}",
            hint="the stats file does not belong to these weights",
        )
    return r, c


def curvature(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
              checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """sqrt(R_i C_j) for a weight (sqrt(v) for a 1-D parameter), dense for this tensor (or block) only."""
    if len(shape) < 2:
        return _vector_stat(name, shape, stats, checkpoint_label=checkpoint_label, block=block).sqrt()
    r, c = row_col_factors(name, shape, stats, checkpoint_label=checkpoint_label, block=block)
    r = r if block is None else block.of(r)
    # Square roots first: R_i * C_j of two small EMAs can underflow float32.
    return torch.outer(r.clamp_min(0).sqrt(), c.clamp_min(0).sqrt()).reshape(shape)


def curvature_mean(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                   checkpoint_label: str) -> float:
    """The mean of ``curvature`` over the whole weight of ``shape``, from its factors alone.

    mean_ij sqrt(R_i) sqrt(C_j) = mean(sqrt R) * mean(sqrt C), in float64: no m x n
    matrix is formed, so every row block of a weight is divided by the same mean
    (equal to the dense float32 mean up to its rounding).
    """
    if len(shape) < 2:
        return _mean(_vector_stat(name, shape, stats, checkpoint_label=checkpoint_label).sqrt())
    r, c = row_col_factors(name, shape, stats, checkpoint_label=checkpoint_label)
    return _mean(r.clamp_min(0).sqrt()) * _mean(c.clamp_min(0).sqrt())


def second_moment(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                  checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """Adafactor's rank-1 reconstruction R C^T / mean(R) of the diagonal second moment.

    It equals the per-entry EMA of G^2 whenever that EMA is rank one, and is the
    diagonal empirical-Fisher proxy that Fisher and OTA merging weight by. mean(R)
    is the whole weight's, also for a row block.
    """
    if len(shape) < 2:
        return _vector_stat(name, shape, stats, checkpoint_label=checkpoint_label, block=block).clamp_min(0)
    r, c = row_col_factors(name, shape, stats, checkpoint_label=checkpoint_label, block=block)
    r, c = r.clamp_min(0), c.clamp_min(0)
    scale = r.mean()
    if scale <= 0:
        return torch.zeros(shape, dtype=torch.float32)
    r = r if block is None else block.of(r)
    return (torch.outer(r, c) / scale).reshape(shape)


def second_moment_mean(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                       checkpoint_label: str, power: float = 1.0) -> float:
    """The mean of ``second_moment ** power`` over the whole weight, from its factors alone.

    mean_ij (R_i C_j / mean(R))^p = mean(R^p) * mean(C^p) / mean(R)^p, in float64
    (see ``curvature_mean``); 0 where the dense second moment is all zeros.
    """
    if len(shape) < 2:
        return _mean(_vector_stat(name, shape, stats, checkpoint_label=checkpoint_label).pow(power))
    r, c = row_col_factors(name, shape, stats, checkpoint_label=checkpoint_label)
    r, c = r.clamp_min(0), c.clamp_min(0)
    scale = r.mean()
    if scale <= 0:
        return 0.0
    return _mean(r.double().pow(power)) * _mean(c.double().pow(power)) / float(scale) ** power


def _mean(values: Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


def full_fisher(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    return _dense_stat(fisher_key(name), name, shape, stats, checkpoint_label=checkpoint_label, block=block)


def _dense_stat(key: str, name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """A per-entry statistic of the weight ``name`` (its rows of ``block``), checked for its size."""
    whole = whole_shape(shape, block)
    value = read_stat(stats, key, checkpoint_label=checkpoint_label)
    if value.numel() != math.prod(whole):
        raise CheckpointError(
            f"{checkpoint_label}: statistic {key!r} has {value.numel()} entries, but {name} has {math.prod(whole)}"
        )
    value = value.reshape(whole)
    return value if block is None else block.of(value)


def _vector_stat(name: str, shape: torch.Size, stats: Mapping[str, Tensor], *,
                 checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    return _dense_stat(vector_key(name), name, shape, stats, checkpoint_label=checkpoint_label,
                       block=block).clamp_min(0)


# ----------------------------------------------------------------------------- scores


def curvature_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                    checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """T^2 * sqrt(R_i C_j): the DESIGN section 4 saliency."""
    t = task_vector.to(torch.float32)
    return t.square() * curvature(name, t.shape, stats, checkpoint_label=checkpoint_label, block=block)


def tensor_curvature_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                           checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """T^2 sqrt(R_i C_j) / mean(sqrt(R C)): curvature ranks entries within a tensor, magnitude across tensors.

    The raw curvature's scale differs by orders of magnitude between tensors
    (and between tasks: a regression loss's gradients are not a cross-entropy's),
    so a global cut on it hands the budget to a few high-curvature tensors;
    dividing by the tensor's mean curvature (from the factors, the whole
    weight's for a row block) leaves the comparison across tensors to T^2.
    """
    mean = curvature_mean(name, whole_shape(task_vector.shape, block), stats, checkpoint_label=checkpoint_label)
    scores = curvature_score(name, task_vector, stats, checkpoint_label=checkpoint_label, block=block)
    return scores / mean if mean > 0 else scores


def row_curvature_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                        checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """T^2 sqrt(C_j) / mean(sqrt C): each row's curvature over its own mean, so sqrt(R_i) cancels.

    Rows compete by magnitude alone (a row no gradient reached, R_i = 0, still
    counts by its T); within a row the column curvature reweights the entries.
    A vector is one row: sqrt(v_i) / mean(sqrt v).
    """
    t = task_vector.to(torch.float32)
    if t.dim() < 2:
        return tensor_curvature_score(name, t, stats, checkpoint_label=checkpoint_label, block=block)
    _, c = row_col_factors(name, t.shape, stats, checkpoint_label=checkpoint_label, block=block)
    root = c.clamp_min(0).sqrt()
    mean = _mean(root)
    weights = root / mean if mean > 0 else root
    return (t.reshape(t.shape[0], -1).square() * weights).reshape(t.shape)


def magnitude_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                    checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """T^2 (ranks entries like |T|, the TIES trim)."""
    return task_vector.to(torch.float32).square()


def fisher_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                 checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """T^2 * F with F the full Fisher diagonal, when the checkpoint recorded one."""
    t = task_vector.to(torch.float32)
    return t.square() * full_fisher(name, t.shape, stats, checkpoint_label=checkpoint_label, block=block)


def trajectory_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                     checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """EMA over training of (T_t G_t)^2, as recorded: the score accumulated along the trajectory.

    It already holds T_t^2, so the final T enters only through the last steps
    of the EMA (the task vector is read for its shape and rows alone).
    """
    return _dense_stat(trajectory_key(name), name, task_vector.shape, stats, checkpoint_label=checkpoint_label,
                       block=block).clone()


def second_moment_score(name: str, task_vector: Tensor, stats: Mapping[str, Tensor], *,
                        checkpoint_label: str, block: RowBlock | None = None) -> Tensor:
    """T^2 * R_i C_j / mean(R): Fast Fisher Grafting (arXiv 2509.11167) on compressed moments."""
    t = task_vector.to(torch.float32)
    return t.square() * second_moment(name, t.shape, stats, checkpoint_label=checkpoint_label, block=block)


# ----------------------------------------------------------------------------- thresholds


def check_keep(keep: object, *, option: str = "keep") -> float:
    """keep must be a fraction in (0, 1]; anything else is a usage error."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ConfigError(f"{option} must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def keep_count(keep: float, total: int) -> int:
    """How many of ``total`` entries a ``keep`` fraction keeps: round(keep * total), at least 1."""
    return min(total, max(1, round(keep * total)))


@dataclass(frozen=True)
class Cut:
    """Where keeping exactly k entries cuts: every score above ``threshold``, then ``ties`` of those equal to it.

    The tied entries kept are the first ``ties`` in the fixed order: tensors in
    name order, entries in row-major order (row blocks in row order). A
    ``Selection`` applies it.
    """

    threshold: float  # the exact k-th largest score
    ties: int  # k minus the entries scoring strictly above the threshold (>= 1)


class Selection:
    """A Cut applied to score tensors in the fixed order: the first tied entries use up the tie allowance.

    Call ``mask`` once per tensor (or row block), in that order; what is left
    of the allowance carries over to the next call, so masks taken block by
    block equal the whole tensor's bit for bit. ``Selection.at_least(t)``
    keeps every entry >= t instead (an explicit threshold, ties and all).
    """

    def __init__(self, cut: Cut):
        self.threshold = cut.threshold
        self.remaining: int | None = cut.ties

    @classmethod
    def at_least(cls, threshold: float) -> Selection:
        selection = cls(Cut(threshold, 0))
        selection.remaining = None
        return selection

    def mask(self, scores: Tensor, out: Tensor | None = None) -> Tensor:
        """The entries kept (True) among ``scores``, the next tensor or row block in order."""
        if self.remaining is None:
            return torch.ge(scores, self.threshold, out=out)
        mask = torch.gt(scores, self.threshold, out=out)
        if self.remaining > 0:
            tied = scores == self.threshold
            count = int(tied.sum())
            if count > self.remaining:
                flat = tied.reshape(-1)
                # int32 where it can count every entry: the running count is the one
                # temporary as large as the tensor (prune hands it whole tensors).
                running = flat.cumsum(0, dtype=torch.int32 if flat.numel() < 2**31 else torch.int64)
                tied = (flat & (running <= self.remaining)).reshape(tied.shape)
                count = self.remaining
            mask |= tied
            self.remaining -= count
        return mask


def tensor_threshold(scores: Tensor, keep: float) -> float:
    """The exact k-th largest score of one tensor."""
    flat = scores.reshape(-1)
    k = keep_count(keep, flat.numel())
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def tensor_cut(scores: Tensor, keep: float) -> Cut:
    """The Cut that keeps exactly k = keep_count(keep, N) entries of one tensor."""
    threshold = tensor_threshold(scores, keep)
    k = keep_count(keep, scores.numel())
    return Cut(threshold, k - int((scores > threshold).sum()))


def top_k_mask(scores: Tensor, keep: float) -> Tensor:
    """Exactly keep_count(keep, N) entries of one tensor: the highest, ties broken in row-major order."""
    return Selection(tensor_cut(scores, keep)).mask(scores)


_HIGH_BINS = 1 << 15  # sign bit is always 0 for non-negative scores
_LOW_BINS = 1 << 16


def streaming_thresholds(batches: Callable[[], Iterable[Sequence[Tensor]]], keep: float) -> list[float]:
    """The thresholds of ``streaming_cuts``: equal to ``tensor_threshold`` on each series' concatenation."""
    return [cut.threshold for cut in streaming_cuts(batches, keep)]


def streaming_cuts(batches: Callable[[], Iterable[Sequence[Tensor]]], keep: float) -> list[Cut]:
    """Exact per-series Cut over many tensors, never concatenating them.

    ``batches()`` is called twice and must yield the same sequence each time: for
    every tensor (or row block), a sequence with one score tensor per series (e.g.
    per task; a stacked (K, ...) tensor will do). Scores are non-negative, so
    their float32 bit patterns order like the values: pass one histograms the
    high 16 bits to find the bin holding the k-th largest, pass two histograms
    the low 16 bits of the entries inside that bin. The bits are read in place as
    int32 (no widening copy); memory is two histograms per series. The result
    equals ``tensor_cut`` on the concatenation, bit for bit: the entries above
    the threshold are counted from the bins above it, so the tie allowance
    comes for free.
    """
    high: list[Tensor] = []
    for scores in batches():
        if not high:
            high = [torch.zeros(_HIGH_BINS, dtype=torch.int64) for _ in scores]
        for histogram, tensor in zip(high, scores):
            histogram += torch.bincount(_score_bits(tensor) >> 16, minlength=_HIGH_BINS)
    if not high:
        raise ValueError("streaming_cuts needs at least one tensor of scores")
    targets = [_locate(histogram, keep_count(keep, int(histogram.sum()))) for histogram in high]

    low = [torch.zeros(_LOW_BINS, dtype=torch.int64) for _ in high]
    for scores in batches():
        for histogram, (bin_index, _), tensor in zip(low, targets, scores):
            bits = _score_bits(tensor)
            inside = bits[(bits >> 16) == bin_index]
            if inside.numel():
                histogram += torch.bincount(inside & 0xFFFF, minlength=_LOW_BINS)
    cuts = []
    for histogram, (bin_index, rank) in zip(low, targets):
        low_index, ties = _locate(histogram, rank)  # rank inside the exact value = the ties to keep
        cuts.append(Cut(_bits_to_float((bin_index << 16) | low_index), ties))
    return cuts


def _score_bits(scores: Tensor) -> Tensor:
    """The float32 bit patterns of |scores| as int32, so that they sort like the values.

    Clearing the sign bit is abs() on the bits: it also turns -0.0 into +0.0,
    whose pattern would otherwise sort first.
    """
    values = scores.detach().reshape(-1).to(torch.float32).contiguous()
    return values.view(torch.int32) & 0x7FFFFFFF


def _locate(histogram: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and its rank (1-based) inside that bin."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
    bin_index = histogram.numel() - 1 - position
    above = int(from_top[position]) - int(histogram[bin_index])
    return bin_index, k - above


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])
