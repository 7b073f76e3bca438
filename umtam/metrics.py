"""GLUE metrics, as the benchmark defines them, in plain numpy.

Per task (values are fractions, not percent):

    cola                      matthews_correlation
    sst2, qnli, rte, wnli,    accuracy
    mnli (each eval split)
    mrpc, qqp                 f1 (positive class 1), accuracy
    stsb                      pearson, spearmanr

Conventions where a metric is undefined (chosen to match sklearn's
zero-division results, and so that scores stay finite and JSON-safe):
Matthews correlation is 0.0 when a row or column of the confusion matrix is
empty (e.g. constant predictions); F1 is 0.0 when there are no positives in
either predictions or labels; Pearson and Spearman are 0.0 when either input
is constant. NaN in regression inputs propagates to a NaN result, so a
diverged model is visible rather than hidden.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _as_pair(predictions, labels, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D arrays of equal, non-zero length (integral ones when ``dtype`` is int)."""
    pred, true = np.asarray(predictions), np.asarray(labels)
    if pred.ndim != 1 or true.ndim != 1:
        raise ValueError(f"expected 1-D predictions and labels, got shapes {pred.shape} and {true.shape}")
    if pred.size == 0:
        raise ValueError("cannot compute a metric on empty inputs")
    if pred.size != true.size:
        raise ValueError(f"{pred.size} predictions but {true.size} labels")
    if dtype is np.int64:
        for name, values in (("predictions", pred), ("labels", true)):
            if not np.all(np.mod(values.astype(np.float64), 1) == 0):
                raise ValueError(f"{name} must be class ids (integers), e.g. logits.argmax(-1)")
    return pred.astype(dtype), true.astype(dtype)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    pred, true = _as_pair(predictions, labels, np.int64)
    return float(np.mean(pred == true))


def f1_binary(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class 1: 2 tp / (2 tp + fp + fn); 0.0 when no positives anywhere."""
    pred, true = _as_pair(predictions, labels, np.int64)
    tp = int(np.sum((pred == 1) & (true == 1)))
    fp = int(np.sum((pred == 1) & (true != 1)))
    fn = int(np.sum((pred != 1) & (true == 1)))
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2 * tp / denominator


def matthews_correlation(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient from the confusion matrix; 0.0 when undefined.

    For two classes this is (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn));
    the multiclass form (Gorodkin's R_K, as in sklearn) is used so that a stray
    class id cannot silently change the formula.
    """
    pred, true = _as_pair(predictions, labels, np.int64)
    classes, encoded = np.unique(np.concatenate([true, pred]), return_inverse=True)
    true_ids, pred_ids = encoded[:true.size], encoded[true.size:]
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * n - pred_counts @ true_counts
    variance_pred = n * n - pred_counts @ pred_counts
    variance_true = n * n - true_counts @ true_counts
    if variance_pred == 0 or variance_true == 0:
        return 0.0
    return float(covariance / np.sqrt(variance_pred * variance_true))


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    pred, true = _as_pair(predictions, labels, np.float64)
    if np.ptp(pred) == 0 or np.ptp(true) == 0:  # exact test: rounding would make a constant wobble
        return 0.0
    pred_centered, true_centered = pred - pred.mean(), true - true.mean()
    norm = np.sqrt(np.sum(pred_centered**2) * np.sum(true_centered**2))
    return float(np.clip(np.sum(pred_centered * true_centered) / norm, -1.0, 1.0))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span (scipy's 'average')."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_run = np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]])
    run_of = np.cumsum(starts_run) - 1
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.append(run_starts[1:], x.size)  # exclusive
    mean_rank = (run_starts + 1 + run_ends) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the average ranks."""
    pred, true = _as_pair(predictions, labels, np.float64)
    if np.isnan(pred).any() or np.isnan(true).any():
        return float("nan")  # ranks would hide the NaN; keep divergence visible
    return pearson(average_ranks(pred), average_ranks(true))


_METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}


def _metric_names(task: str) -> tuple[str, ...]:
    from umtam.tasks import task_spec

    return task_spec(task).metrics


def compute_metrics(task: str, predictions, labels) -> dict[str, float]:
    """The task's official GLUE metrics; predictions are class ids (floats for stsb)."""
    return {name: _METRIC_FUNCTIONS[name](predictions, labels) for name in _metric_names(task)}


def score(task: str, metrics: Mapping[str, float]) -> float:
    """The GLUE task score: the mean of the task's metrics.

    This is the leaderboard convention: MRPC and QQP average F1 and accuracy,
    STS-B averages Pearson and Spearman, single-metric tasks use that metric.
    (MNLI's matched/mismatched average is the caller's to take, per split.)
    """
    names = _metric_names(task)
    missing = [name for name in names if name not in metrics]
    if missing:
        raise ValueError(f"metrics for {task!r} lack {', '.join(missing)}")
    return float(sum(metrics[name] for name in names) / len(names))


def majority_score(task: str, labels: Sequence[float]) -> float:
    """The best score a constant prediction reaches on ``labels``: the majority-class baseline.

    Every class id present is tried as the constant (for MRPC predicting the
    positive class wins on F1 even where it is not the majority); a constant
    regression output correlates with nothing, which the conventions above
    score 0.0.
    """
    from umtam.tasks import task_spec

    true = np.asarray(labels)
    if true.size == 0:
        raise ValueError("cannot compute a baseline on empty labels")
    constants = [float(true.mean())] if task_spec(task).is_regression else np.unique(true).tolist()
    return max(score(task, compute_metrics(task, np.full(true.size, c), true)) for c in constants)


def chance_score(task: str, labels: Sequence[float]) -> float:
    """The score of guessing uniformly at random over the task's classes, in expectation.

    Accuracy 1/C; F1 with positive rate p among the labels p / (p + 1/2) (the
    ratio of expected counts: tp = p/2, fp = (1-p)/2, fn = p/2 per example);
    Matthews, Pearson and Spearman 0. Regression has no classes: 0.0.
    """
    from umtam.tasks import task_spec

    spec, true = task_spec(task), np.asarray(labels)
    if true.size == 0:
        raise ValueError("cannot compute a baseline on empty labels")
    if spec.is_regression:
        return 0.0
    positive_rate = float(np.mean(true == 1))
    expected = {"accuracy": 1.0 / spec.num_labels, "f1": positive_rate / (positive_rate + 0.5),
                "matthews_correlation": 0.0, "pearson": 0.0, "spearmanr": 0.0}
    return score(task, expected)
