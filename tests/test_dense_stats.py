"""Opt-in dense statistics through `umtam train`: the same weights, the extra statistics, and their scores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli

# Four tiny trainings through the CLI: the tracker's math and resume are in the default suite
# (test_tracker.py, test_resume.py); this end-to-end check runs with --slow, as CI does.
pytestmark = pytest.mark.slow


def _train(out, tiny_model_dir, glue_dir, *extra, task="mrpc"):
    code, _, stderr = run_cli(
        "train", "--task", task, "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
        "--optimizer", "umtam", "--rank", "2", "--lr", "1e-3", "--epochs", "1", "--batch-size", "8",
        "--max-length", "32", "--seed", "7", "-o", str(out), "--quiet", *extra,
    )
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, glue_dir):
    root = tmp_path_factory.mktemp("dense")
    plain = _train(root / "plain", tiny_model_dir, glue_dir)
    tracked = _train(root / "tracked", tiny_model_dir, glue_dir, "--track-fisher", "--track-trajectory")
    return plain, tracked


def test_tracking_changes_no_weight_and_adds_only_the_dense_statistics(runs):
    plain, tracked = runs
    assert (plain / "model.safetensors").read_bytes() == (tracked / "model.safetensors").read_bytes()
    a, b = load_file(plain / "stats.safetensors"), load_file(tracked / "stats.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    added = set(b) - set(a)
    weights = load_file(tracked / "model.safetensors")
    assert {key.split("/", 1)[0] for key in added} == {"fisher", "trajectory"}
    for key in added:  # one per-entry statistic per trained tensor, finite and non-negative
        name = key.split("/", 1)[1]
        assert b[key].shape == weights[name].shape and bool((b[key] >= 0).all()) and bool(b[key].isfinite().all())
    config = json.loads((tracked / "umtam.json").read_text())["training"]["config"]
    assert config["track_fisher"] is True and config["track_trajectory"] is True


@pytest.mark.parametrize("score", ["fisher", "trajectory"])
def test_prune_by_the_tracked_scores(runs, score, tmp_path):
    _, tracked = runs
    code, stdout, stderr = run_cli("prune", str(tracked), "--keep", "0.2", "--score", score,
                                   "-o", str(tmp_path / score), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["score"] == score


def test_a_checkpoint_without_them_names_the_flag(runs, tmp_path):
    plain, _ = runs
    code, _, stderr = run_cli("prune", str(plain), "--keep", "0.2", "--score", "trajectory", "-o", str(tmp_path / "x"))
    assert code != 0 and "trajectory/" in stderr and "--track-trajectory" in stderr and not (tmp_path / "x").exists()


def test_merge_and_inspect_read_a_checkpoint_with_dense_statistics(runs, tmp_path, tiny_model_dir, glue_dir):
    plain, tracked = runs
    other = _train(tmp_path / "sst2", tiny_model_dir, glue_dir, "--track-trajectory", task="sst2")
    code, stdout, stderr = run_cli("inspect", str(tracked), "--json")
    assert code == 0, stderr
    code, _, stderr = run_cli("merge", str(tracked), str(other), "--option", "trim=trajectory", "--keep", "0.5",
                              "-o", str(tmp_path / "merged"))
    assert code == 0, stderr
    # trimming by a statistic only one input recorded is refused, naming it, with nothing written
    code, _, stderr = run_cli("merge", str(plain), str(other), "--option", "trim=trajectory",
                              "-o", str(tmp_path / "refused"))
    assert code != 0 and "trajectory/" in stderr and not (tmp_path / "refused").exists()
