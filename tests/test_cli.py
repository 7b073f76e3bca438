"""End to end through the CLI on the tiny model: train -> inspect -> eval."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli_runner import run_cli
from umtam.data import load_task
from umtam.evaluate import NORMALIZE_MARGIN, no_skill_score
from umtam_cli.main import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, glue_dir):
    out = tmp_path_factory.mktemp("runs") / "mrpc"
    code, stdout, stderr = run_cli(
        "train", "--task", "mrpc", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
        "--optimizer", "umtam", "--rank", "2", "--lr", "1e-3", "--epochs", "2", "--batch-size", "8",
        "--max-length", "32", "--seed", "7", "-o", str(out), "--json", "--quiet",
    )
    assert code == 0, stderr
    return out, json.loads(stdout)


def test_train_reports_metrics_and_writes_a_complete_sidecar(trained):
    out, summary = trained
    sidecar = json.loads((out / "umtam.json").read_text())
    assert summary["task"] == "mrpc" and summary["optimizer"] == "umtam"
    # 24 tiny training rows, batch 8 -> 3 steps per epoch, 2 epochs
    assert sidecar["steps"] == summary["steps"] == 6
    assert sidecar["kind"] == "train" and sidecar["schema_version"] == 1 and sidecar["seed"] == 7
    dev = sidecar["tasks"]["mrpc"]["metrics"]["validation"]
    assert set(dev) == {"accuracy", "f1"} and 0.0 <= dev["accuracy"] <= 1.0
    assert summary["metrics"]["validation"] == dev
    assert sidecar["optimizer"]["name"] == "umtam"
    assert sidecar["optimizer"]["hyperparameters"]["rank"] == 2
    assert sidecar["optimizer"]["state_bytes"] > 0
    assert sidecar["peak_rss_bytes"] > 10_000_000 and sidecar["seconds_per_step"] > 0
    assert len(sidecar["base_model"]["fingerprint"]) == 64
    assert sidecar["tasks"]["mrpc"]["label_names"] == ["not_equivalent", "equivalent"]
    assert {"model.safetensors", "stats.safetensors", "config.json"} <= set(sidecar["files"])


def test_inspect_json_matches_the_sidecar(trained):
    out, _ = trained
    code, stdout, stderr = run_cli("inspect", str(out), "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    sidecar = json.loads((out / "umtam.json").read_text())
    assert summary["kind"] == "train"
    assert summary["optimizer"]["state_bytes"] == sidecar["optimizer"]["state_bytes"]
    # every 2-D weight has row and column statistics, every 1-D parameter a full one
    assert summary["stats"]["exp_avg_sq_row"] == summary["stats"]["exp_avg_sq_col"] > 0
    assert summary["stats"]["exp_avg_sq"] > 0
    assert summary["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size


def test_inspect_table_names_the_fields(trained):
    out, _ = trained
    code, stdout, _ = run_cli("inspect", str(out))
    assert code == 0
    for field in ("kind", "base model", "parameters", "stats", "optimizer state", "peak RSS"):
        assert field in stdout


def test_eval_reproduces_the_training_time_metrics(trained, glue_dir):
    out, summary = trained
    code, stdout, stderr = run_cli("eval", str(out), "--task", "glue", "--data-dir", str(glue_dir),
                                   "--max-length", "32", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["tasks"]["mrpc"]["splits"]["validation"] == summary["metrics"]["validation"]
    metrics = summary["metrics"]["validation"]
    assert report["tasks"]["mrpc"]["score"] == pytest.approx((metrics["f1"] + metrics["accuracy"]) / 2)


def test_same_seed_same_weights(trained, tmp_path, tiny_model_dir, glue_dir):
    out, _ = trained
    again = tmp_path / "again"
    code, _, stderr = run_cli(
        "train", "--task", "mrpc", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
        "--optimizer", "umtam", "--rank", "2", "--lr", "1e-3", "--epochs", "2", "--batch-size", "8",
        "--max-length", "32", "--seed", "7", "-o", str(again), "--quiet",
    )
    assert code == 0, stderr
    first = json.loads((out / "umtam.json").read_text())["files"]
    second = json.loads((again / "umtam.json").read_text())["files"]
    assert first["model.safetensors"]["sha256"] == second["model.safetensors"]["sha256"]
    assert first["stats.safetensors"]["sha256"] == second["stats.safetensors"]["sha256"]


def test_transformers_loads_the_checkpoint_and_predicts_the_same(trained, glue_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from umtam.checkpoint import load_checkpoint
    from umtam.evaluate import build_task_model

    out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ckpt = load_checkpoint(out)
    ours = build_task_model(ckpt, "mrpc", ckpt.load_tensors()).eval()
    batch = tokenizer(["the cat sees a dog ."], ["the cat not sees a dog ."], return_tensors="pt")
    with torch.no_grad():
        theirs_logits, ours_logits = model(**batch).logits, ours(**batch).logits
    # same weights; transformers may pick another attention kernel, so allow float noise
    assert torch.allclose(theirs_logits, ours_logits, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}


@pytest.mark.parametrize(
    "args, code, message",
    # Only what tests/test_bad_input.py's matrix lacks: the unknown task, rank 0, a negative lr, a missing
    # model, data directory or checkpoint and an existing output are cases of that matrix.
    [
        (["train", "--task", "mrpc"], 2, "output: required"),
        (["train", "--task", "mrpc", "--bogus", "-o", "OUT"], 2, "No such option '--bogus'"),
        (["train", "--task", "mrpc", "--model", "no-such-org/no-such-model", "-o", "OUT"], 2,
         "cannot load model 'no-such-org/no-such-model'"),
        (["train", "--task", "qqp", "--data-dir", "EMPTY", "-o", "OUT"], 1, "no GLUE data for task 'qqp'"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(args, code, message, tmp_path):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / arg) if arg in ("OUT", "MISSING", "EMPTY") else arg for arg in args]
    got, stdout, stderr = run_cli(*args)
    assert got == code
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "OUT").exists()


def test_top_level_help_lists_commands_without_importing_torch():
    probe = (
        "import sys; from umtam_cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("NO-TORCH")
    for name in ("train", "eval", "inspect", "prune", "merge"):
        assert name in result.stdout


def test_every_subcommand_help_has_examples():
    runner = CliRunner()
    for name in ("train", "eval", "inspect", "prune", "merge"):
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Examples:" in result.output


def test_train_help_renders_the_task_and_optimizer_registries_and_the_resumable_options(monkeypatch):
    """Nothing in the epilog is written by hand: a task or optimizer registered in memory appears in it."""
    import re

    from umtam.config.train import TrainConfig
    from umtam.optim.registry import OPTIMIZERS, OptimizerSpec
    from umtam.tasks import TASKS, get_task
    from umtam_cli.cmd_train import epilog

    monkeypatch.setattr(TASKS, "_specs", dict(TASKS._specs))
    monkeypatch.setattr(OPTIMIZERS, "_specs", dict(OPTIMIZERS._specs))
    TASKS.register(get_task("rte").__class__(**{**vars(get_task("rte")), "name": "rte2"}))
    OPTIMIZERS.register(OptimizerSpec("lion", 3e-5, "nowhere:build", "a registered test optimizer"))
    prose = " ".join(epilog().split())
    assert re.search(r"Tasks: ([a-z0-9 ]+)\.", prose).group(1).split() == [*TASKS.names()]
    assert "rte2" in prose and "lion 3e-5 a registered test optimizer" in prose
    changes = re.search(r"must match the saved run's, except (.+?)\. ", prose).group(1)
    assert set(re.findall(r"--[a-z-]+", changes)) == {
        "--" + key.replace("_", "-") for key in TrainConfig.resumable_options()}
    # where the data lives may change (the tokenized training set is checked by digest); what it is may not
    assert set(TrainConfig.resumable_options()) == {"output", "force", "state_dir", "save_every", "data_dir", "data",
                                                    "eval_data", "device", "eval_batch_size", "eval_every", "lr",
                                                    "plot_loss"}


def test_prune_help_lists_every_registered_score_and_marks_the_default(monkeypatch):
    from umtam.scores import DEFAULT_SCORE, SCORES, ScoreSpec
    from umtam_cli.cmd_prune import epilog

    monkeypatch.setattr(SCORES, "_specs", dict(SCORES._specs))
    SCORES.register(ScoreSpec("snip", "snip_score", lambda name, ndim: (), "a registered test score"))
    lines = [" ".join(line.split()) for line in epilog().split("Scores (--score):")[1].strip().splitlines()]
    assert [line.split()[0] for line in lines] == [*SCORES.names()]
    assert "snip a registered test score" in lines and f"{DEFAULT_SCORE} " in next(l for l in lines if "[default]" in l)


@pytest.fixture(scope="module")
def second_expert(tmp_path_factory, tiny_model_dir, glue_dir):
    out = tmp_path_factory.mktemp("runs") / "sst2"
    code, _, stderr = run_cli(
        "train", "--task", "sst2", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
        "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "2", "--batch-size", "8",
        "--max-length", "32", "--seed", "7", "-o", str(out), "--quiet",
    )
    assert code == 0, stderr
    return out


def test_prune_keeps_the_requested_fraction_and_evaluates(trained, tmp_path, glue_dir):
    out, _ = trained
    pruned = tmp_path / "pruned"
    code, stdout, stderr = run_cli("prune", str(out), "--keep", "0.1", "-o", str(pruned), "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["kept_fraction"] == pytest.approx(0.1, abs=0.002)
    sidecar = json.loads((pruned / "umtam.json").read_text())
    assert sidecar["kind"] == "prune"
    assert sidecar["lineage"]["method"] == {"keep": 0.1, "score": "curvature-row", "scope": "global"}
    assert sidecar["lineage"]["inputs"][0]["sha256"] == json.loads(
        (out / "umtam.json").read_text())["files"]["model.safetensors"]["sha256"]
    code, stdout, stderr = run_cli("eval", str(pruned), "--data-dir", str(glue_dir), "--max-length", "32", "--json")
    assert code == 0, stderr
    assert set(json.loads(stdout)["tasks"]) == {"mrpc"}


def test_merge_then_eval_every_head_with_normalised_scores(trained, second_expert, tmp_path, glue_dir):
    out, _ = trained
    merged = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", str(out), str(second_expert), "--keep", "0.5", "-o", str(merged),
                                   "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["tasks"] == ["mrpc", "sst2"]
    sidecar = json.loads((merged / "umtam.json").read_text())
    assert sidecar["kind"] == "merge" and sidecar["lineage"]["method"] == "umtam"
    code, stdout, stderr = run_cli("eval", str(merged), "--task", "glue", "--data-dir", str(glue_dir),
                                   "--max-length", "32", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert set(report["tasks"]) == {"mrpc", "sst2"}
    for task, expert_dir in (("mrpc", out), ("sst2", second_expert)):
        expert = json.loads((expert_dir / "umtam.json").read_text())["tasks"][task]["metrics"]["validation"]
        expert_score = sum(expert.values()) / len(expert)
        result = report["tasks"][task]
        # the share of the expert's gain over the no-skill floor of these dev rows that the merge keeps;
        # none when the expert itself is within the margin of that floor
        labels = [example.label for example in load_task(task, data_dir=glue_dir, need_train=False).eval["validation"]]
        floor = no_skill_score(task, labels)
        gain = expert_score - floor
        assert result["normalized"] == (None if gain < NORMALIZE_MARGIN
                                        else pytest.approx((result["score"] - floor) / gain))
    code, stdout, _ = run_cli("inspect", str(merged), "--json")
    assert code == 0 and json.loads(stdout)["kind"] == "merge"


def test_merge_dry_run_writes_nothing(trained, second_expert, tmp_path):
    out, _ = trained
    code, stdout, stderr = run_cli("merge", str(out), str(second_expert), "--dry-run", "--json",
                                   "-o", str(tmp_path / "never"))
    assert code == 0, stderr
    plan = json.loads(stdout)
    assert plan["method"] == "umtam" and plan["tasks"] == ["mrpc", "sst2"] and plan["estimated_peak_bytes"] > 0
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "extra, message",
    # unknown method, keep out of range and a single input are cases of tests/test_bad_input.py's matrix
    [
        (["--method", "average", "--keep", "0.2"], "keep"),
    ],
)
def test_merge_usage_errors(trained, second_expert, tmp_path, extra, message):
    out, _ = trained
    code, _, stderr = run_cli("merge", str(out), str(second_expert), *extra, "-o", str(tmp_path / "m"))
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_holdout_slice_is_recorded_and_evaluated_again(tmp_path, tiny_model_dir, glue_dir):
    out = tmp_path / "rte"
    code, _, stderr = run_cli(
        "train", "--task", "rte", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
        "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "1", "--batch-size", "8", "--max-length", "32",
        "--holdout-fraction", "0.25", "-o", str(out), "--quiet",
    )
    assert code == 0, stderr
    sidecar = json.loads((out / "umtam.json").read_text())
    assert sidecar["steps"] == 3  # 24 rows, a quarter held out, batch 8
    held = sidecar["tasks"]["rte"]["holdout_metrics"]
    code, stdout, stderr = run_cli("eval", str(out), "--data-dir", str(glue_dir), "--max-length", "32",
                                   "--holdout-fraction", "0.25", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["tasks"]["rte"]["splits"] == {"holdout": held}


def test_stsb_trains_a_regression_head_and_eval_reproduces_its_correlations(tmp_path, tiny_model_dir, glue_dir):
    out = tmp_path / "stsb"
    code, stdout, stderr = run_cli(
        "train", "--task", "stsb", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
        "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "2", "--batch-size", "8", "--max-length", "32",
        "--seed", "7", "-o", str(out), "--json", "--quiet",
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    record = json.loads((out / "umtam.json").read_text())["tasks"]["stsb"]
    assert record["is_regression"] is True and record["label_names"] == []
    dev = record["metrics"]["validation"]
    assert set(dev) == {"pearson", "spearmanr"} and all(-1.0 <= value <= 1.0 for value in dev.values())
    assert summary["metrics"] == record["metrics"] and summary["steps"] == 6  # 24 rows, batch 8, 2 epochs
    # one output, a score, not class logits; transformers reads it as a regression head
    from safetensors.torch import load_file

    assert load_file(out / "model.safetensors")["classifier.weight"].shape[0] == 1
    assert json.loads((out / "config.json").read_text())["problem_type"] == "regression"
    code, stdout, stderr = run_cli("eval", str(out), "--data-dir", str(glue_dir), "--max-length", "32", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)["tasks"]["stsb"]
    assert report["splits"] == {"validation": dev}
    assert report["score"] == pytest.approx((dev["pearson"] + dev["spearmanr"]) / 2)
