"""GLUE scores: a task's score (MNLI: the mean over its two dev splits) and the expert-normalised
score, by hand and through `umtam eval` on a tiny MNLI checkpoint."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli
from glue_fixtures import write_glue_dir
from umtam.evaluate import no_skill_score, normalized_score, task_score
from umtam.metrics import chance_score, majority_score


def test_task_score_is_the_mean_of_the_tasks_metrics():
    assert task_score("mrpc", {"validation": {"f1": 0.9, "accuracy": 0.6}}) == pytest.approx(0.75)
    assert task_score("stsb", {"validation": {"pearson": 0.9, "spearmanr": 0.7}}) == pytest.approx(0.8)
    assert task_score("cola", {"validation": {"matthews_correlation": 0.3}}) == pytest.approx(0.3)


def test_mnli_score_is_the_mean_over_matched_and_mismatched():
    splits = {"validation_matched": {"accuracy": 0.8}, "validation_mismatched": {"accuracy": 0.6}}
    assert task_score("mnli", splits) == pytest.approx(0.7)


def test_normalized_score_divides_by_the_experts_dev_score():
    # the expert scored (0.8 + 0.6) / 2 = 0.7 on MNLI; the merge (0.63 + 0.49) / 2 = 0.56 -> 0.56 / 0.7
    record = {"expert_metrics": {"validation_matched": {"accuracy": 0.8}, "validation_mismatched": {"accuracy": 0.6}}}
    splits = {"validation_matched": {"accuracy": 0.63}, "validation_mismatched": {"accuracy": 0.49}}
    assert normalized_score("mnli", splits, record) == pytest.approx(0.8)


def test_holdout_normalized_score_divides_by_the_experts_holdout_score():
    # MRPC expert: dev score 0.5, holdout score (0.9 + 0.7) / 2 = 0.8; the merge's holdout (0.7 + 0.5) / 2 = 0.6
    record = {"expert_metrics": {"validation": {"f1": 0.5, "accuracy": 0.5}},
              "expert_holdout_metrics": {"f1": 0.9, "accuracy": 0.7}}
    splits = {"holdout": {"f1": 0.7, "accuracy": 0.5}}
    assert normalized_score("mrpc", splits, record, "expert_holdout_metrics") == pytest.approx(0.6 / 0.8)
    assert normalized_score("mrpc", splits, record) == pytest.approx(0.6 / 0.5)  # the dev reference: another number


@pytest.mark.parametrize("record", [
    {"expert_metrics": {"validation": {"accuracy": 0.7}}},  # trained without --holdout-fraction
    {"expert_metrics": {"validation": {"accuracy": 0.7}}, "expert_holdout_metrics": None},
    {"expert_holdout_metrics": {"accuracy": 0.0}},  # nothing to divide by
], ids=["no-holdout-record", "holdout-null", "holdout-score-zero"])
def test_holdout_normalized_score_is_none_without_an_expert_holdout_score(record):
    assert normalized_score("rte", {"holdout": {"accuracy": 0.6}}, record, "expert_holdout_metrics") is None


def test_normalized_score_is_none_for_an_unmerged_expert_or_a_zero_score():
    assert normalized_score("rte", {"validation": {"accuracy": 0.6}}, {"metrics": {"validation": {"accuracy": 0.6}}}) \
        is None
    assert normalized_score("rte", {"validation": {"accuracy": 0.6}},
                            {"expert_metrics": {"validation": {"accuracy": 0.0}}}) is None


def test_normalized_score_is_the_share_of_the_experts_gain_over_the_floor():
    # RTE: no-skill floor 0.5, expert 0.7, merge 0.6 -> kept (0.6 - 0.5) / (0.7 - 0.5) = 0.5 of the gain
    record = {"expert_metrics": {"validation": {"accuracy": 0.7}}}
    assert normalized_score("rte", {"validation": {"accuracy": 0.6}}, record, floor=0.5) == pytest.approx(0.5)
    # below the floor it goes negative, but only by the merge's distance below it over a gain >= the margin
    assert normalized_score("rte", {"validation": {"accuracy": 0.45}}, record, floor=0.5) == pytest.approx(-0.25)


def test_normalized_score_is_none_for_an_expert_within_the_margin_of_its_floor():
    # the case: a CoLA expert at MCC 0.059 made a merge's -0.0395 into -67% as a plain ratio
    cola = {"expert_metrics": {"validation": {"matthews_correlation": 0.059}}}
    assert normalized_score("cola", {"validation": {"matthews_correlation": -0.0395}}, cola) is None
    # an RTE expert 9 points over the majority class of its rows; 12 over a lower floor
    rte = {"expert_metrics": {"validation": {"accuracy": 0.62}}}
    assert normalized_score("rte", {"validation": {"accuracy": 0.55}}, rte, floor=0.53) is None
    assert normalized_score("rte", {"validation": {"accuracy": 0.55}}, rte, floor=0.50) == pytest.approx(0.05 / 0.12)


def test_majority_and_chance_baselines_by_hand():
    # MRPC labels 1,1,1,0: always 1 -> f1 2*3/(2*3+1) = 6/7, accuracy 3/4; always 0 -> 0 and 1/4
    assert majority_score("mrpc", [1, 1, 1, 0]) == pytest.approx((6 / 7 + 0.75) / 2)
    # guessing: accuracy 1/2, f1 p/(p+1/2) = 0.75/1.25
    assert chance_score("mrpc", [1, 1, 1, 0]) == pytest.approx((0.6 + 0.5) / 2)
    assert majority_score("rte", [0, 0, 1]) == pytest.approx(2 / 3) and chance_score("rte", [0, 0, 1]) == 0.5
    assert majority_score("cola", [1, 1, 0]) == 0.0 and chance_score("cola", [1, 1, 0]) == 0.0
    assert majority_score("stsb", [0.5, 4.0, 2.5]) == 0.0 and chance_score("stsb", [0.5, 4.0, 2.5]) == 0.0
    assert no_skill_score("mrpc", [1, 1, 1, 0]) == pytest.approx((6 / 7 + 0.75) / 2)
    with pytest.raises(ValueError):
        majority_score("rte", [])


def test_eval_of_a_tiny_mnli_checkpoint_reports_both_splits(tmp_path, tiny_model_dir):
    glue = write_glue_dir(tmp_path, tasks=("mnli",))
    # Keep only the 4 entailment rows of dev_mismatched (dev_matched keeps its 12 balanced rows), so the
    # two splits score differently even for a model that predicts one class: a third on matched, 0 or 1 on
    # mismatched. A score read from one split alone would then differ from the mean.
    mismatched = glue / "MNLI" / "dev_mismatched.tsv"
    header, *rows = mismatched.read_text().splitlines()
    kept = [row for row in rows if row.endswith("\tentailment")]
    assert (len(rows), len(kept)) == (12, 4)
    mismatched.write_text("\n".join([header, *kept]) + "\n")
    out = tmp_path / "mnli"
    code, stdout, stderr = run_cli(
        "train", "--task", "mnli", "--model", str(tiny_model_dir), "--data-dir", str(glue), "--optimizer", "adamw",
        "--lr", "1e-3", "--max-steps", "3", "--batch-size", "8", "--max-length", "32", "--seed", "7", "-o", str(out),
        "--json", "--quiet")
    assert code == 0, stderr
    trained = json.loads(stdout)["metrics"]
    assert set(trained) == {"validation_matched", "validation_mismatched"}
    matched, mismatched_accuracy = (trained[split]["accuracy"] for split in ("validation_matched",
                                                                            "validation_mismatched"))
    assert matched != mismatched_accuracy

    code, stdout, stderr = run_cli("eval", str(out), "--data-dir", str(glue), "--max-length", "32", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["tasks"]["mnli"]["splits"] == trained
    assert report["tasks"]["mnli"]["score"] == pytest.approx((matched + mismatched_accuracy) / 2)
    assert report["average_score"] == report["tasks"]["mnli"]["score"]
    assert report["tasks"]["mnli"]["normalized"] is None  # an expert has no expert to be normalised by
