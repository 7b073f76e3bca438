"""umtam.metrics against hand-computed values (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from umtam.errors import ConfigError
from umtam.metrics import (accuracy, average_ranks, compute_metrics, f1_binary,
                           matthews_correlation, pearson, score, spearman)


def test_accuracy():
    # pred [1,0,1,1] vs true [1,1,1,0]: positions 0 and 2 agree -> 2/4.
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_f1_from_known_counts():
    # pred [1,1,0,1,0,0,1], true [1,1,1,1,1,0,0]:
    # tp = 3 (positions 0,1,3), fp = 1 (position 6), fn = 2 (positions 2,4), tn = 1.
    # precision 3/4, recall 3/5 -> F1 = 2 tp / (2 tp + fp + fn) = 6 / 9 = 2/3.
    assert f1_binary([1, 1, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 0, 0]) == pytest.approx(2 / 3)


def test_f1_is_zero_without_any_positive():
    # tp = fp = fn = 0: undefined, reported 0.0 (sklearn's zero_division default).
    assert f1_binary([0, 0], [0, 0]) == 0.0


def test_matthews_correlation_six_elements():
    # true [1,1,1,0,0,0], pred [1,1,0,0,0,1]: tp = 2, fn = 1, tn = 2, fp = 1.
    # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3*3*3*3) = 3/9 = 1/3.
    assert matthews_correlation([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)


def test_matthews_correlation_extremes_and_undefined():
    assert matthews_correlation([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_correlation([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    # Constant predictions: (tp+fp)(tn+fn) has a zero factor -> undefined -> 0.0.
    assert matthews_correlation([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0
    assert matthews_correlation([1, 1], [1, 1]) == 0.0


def test_matthews_correlation_three_classes():
    # true [0,0,1,1,2,2], pred [0,1,1,1,2,0]; confusion rows=true, cols=pred:
    # [[1,1,0],[0,2,0],[1,0,1]]; n = 6, correct c = 4, true counts t = (2,2,2), pred counts p = (2,3,1).
    # cov = c n - p.t = 24 - (4+6+2) = 12; n^2 - p.p = 36 - 14 = 22; n^2 - t.t = 36 - 12 = 24.
    # MCC = 12 / sqrt(22 * 24) = 12 / sqrt(528).
    assert matthews_correlation([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(12 / math.sqrt(528))


def test_pearson():
    # x = [1,2,3], y = [1,2,5]; means 2 and 8/3; dx = [-1,0,1], dy = [-5/3,-2/3,7/3].
    # sum dx dy = 5/3 + 7/3 = 4; sum dx^2 = 2; sum dy^2 = (25+4+49)/9 = 78/9.
    # r = 4 / sqrt(2 * 78/9) = 12 / sqrt(156).
    assert pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(12 / math.sqrt(156))
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)


def test_pearson_constant_input_is_zero():
    # Zero variance: undefined; 0.0 even where rounding would leave a tiny spread after centring.
    assert pearson([0.1, 0.1, 0.1], [1.0, 2.0, 3.0]) == 0.0


def test_average_ranks_share_ties():
    # sorted: 5 (rank 1), 10 (rank 2), 20,20,20 (ranks 3,4,5 -> mean 4).
    assert average_ranks([10, 20, 20, 20, 5]).tolist() == [2.0, 4.0, 4.0, 4.0, 1.0]


def test_spearman_with_ties():
    # x = [1,2,2,3] -> ranks [1,2.5,2.5,4]; y = [1,3,2,4] -> ranks [1,3,2,4]; both mean 2.5.
    # dx = [-1.5,0,0,1.5], dy = [-1.5,0.5,-0.5,1.5]: sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5.
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))


def test_spearman_only_sees_order():
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)


def test_nan_regression_predictions_stay_visible():
    assert math.isnan(pearson([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]))


@pytest.mark.parametrize("task, keys", [
    ("cola", {"matthews_correlation"}), ("sst2", {"accuracy"}), ("mrpc", {"f1", "accuracy"}),
    ("qqp", {"f1", "accuracy"}), ("stsb", {"pearson", "spearmanr"}), ("mnli", {"accuracy"}),
    ("qnli", {"accuracy"}), ("rte", {"accuracy"}), ("wnli", {"accuracy"}),
])
def test_compute_metrics_reports_the_official_metrics(task, keys):
    metrics = compute_metrics(task, [1, 0, 1, 1], [1, 0, 0, 1])
    assert set(metrics) == keys and all(type(value) is float for value in metrics.values())


def test_mrpc_metrics_and_score():
    # pred [1,1,0,1], true [1,0,0,1]: accuracy 3/4; tp = 2, fp = 1, fn = 0 -> F1 = 4/5.
    metrics = compute_metrics("mrpc", np.array([1, 1, 0, 1]), np.array([1, 0, 0, 1]))
    assert metrics == pytest.approx({"f1": 0.8, "accuracy": 0.75})
    assert score("mrpc", metrics) == pytest.approx((0.8 + 0.75) / 2)


def test_stsb_score_averages_pearson_and_spearman():
    metrics = compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    # Ranks are identical ([1,2,3]) so Spearman is 1; Pearson is 12 / sqrt(156) (above).
    assert metrics["spearmanr"] == pytest.approx(1.0)
    assert score("stsb", metrics) == pytest.approx((12 / math.sqrt(156) + 1.0) / 2)


def test_each_task_spec_names_the_glue_metrics():
    from umtam.tasks import TASKS

    assert {spec.name: spec.metrics for spec in TASKS if spec.kind == "classification"} == {
        "cola": ("matthews_correlation",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
        "stsb": ("pearson", "spearmanr"), "qqp": ("f1", "accuracy"), "mnli": ("accuracy",),
        "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",)}


@pytest.mark.parametrize("predictions, labels, message", [
    ([], [], "empty"),
    ([1, 0], [1, 0, 1], "2 predictions but 3 labels"),
    ([0.4, 1.0], [0, 1], "class ids"),
    ([[0.1, 0.9]], [1], "1-D"),
])
def test_bad_inputs_are_value_errors(predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics("rte", predictions, labels)


def test_unknown_task_suggests_a_close_name():
    with pytest.raises(ConfigError) as caught:
        compute_metrics("stsbb", [1.0], [1.0])
    assert "'stsbb'" in caught.value.message and caught.value.message.endswith("(did you mean 'stsb'?)")


def test_score_needs_every_metric_of_the_task():
    with pytest.raises(ValueError, match="lack accuracy"):
        score("mrpc", {"f1": 0.8})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-100, 100), st.integers(-100, 100)), min_size=2, max_size=30))
def test_correlations_are_symmetric_bounded_and_order_based(pairs):
    x, y = (np.array(values, dtype=np.float64) for values in zip(*pairs))
    r = pearson(x, y)
    assert -1.0 <= r <= 1.0 and r == pytest.approx(pearson(y, x), abs=1e-9)
    # A strictly increasing map (exact on these integers) keeps the order, so Spearman does not move.
    assert spearman(3 * x + 7, y) == pytest.approx(spearman(x, y), abs=1e-9)
    assert spearman(x**3, y) == pytest.approx(spearman(x, y), abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=40))
def test_binary_mcc_matches_the_textbook_formula(pairs):
    pred, true = (np.array(values) for values in zip(*pairs))
    tp = np.sum((pred == 1) & (true == 1)); tn = np.sum((pred == 0) & (true == 0))
    fp = np.sum((pred == 1) & (true == 0)); fn = np.sum((pred == 0) & (true == 1))
    denominator = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    expected = 0.0 if denominator == 0 else float(tp * tn - fp * fn) / denominator
    assert matthews_correlation(pred, true) == pytest.approx(expected, abs=1e-12)
