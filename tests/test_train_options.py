"""`umtam train` options through the real CLI on the tiny model and tiny GLUE: a YAML recipe
(--config) and the flags that win over it, and UMTAM's --error-feedback and --dense-embeddings,
seen in the sidecar's recorded config, optimizer hyperparameters and state bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_runner import run_cli

RANK = 2


def train(*args: str) -> dict:
    """Run `umtam train ARGS --quiet`; return the written sidecar."""
    out = Path(args[args.index("-o") + 1])
    code, _, stderr = run_cli("train", *args, "--quiet")
    assert code == 0, stderr
    return json.loads((out / "umtam.json").read_text())


def tiny_run(model: Path, glue: Path) -> list[str]:
    return ["--task", "mrpc", "--model", str(model), "--data-dir", str(glue), "--optimizer", "umtam",
            "--rank", str(RANK), "--lr", "1e-3", "--max-steps", "2", "--batch-size", "8", "--max-length", "32"]


# ----------------------------------------------------------------------------- --config


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, glue_dir) -> tuple[Path, dict]:
    """A recipe as a user writes it, and the option values it means."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
task: mrpc
model: {tiny_model_dir}
data_dir: {glue_dir}
optimizer: umtam
rank: 2
lr: 1.0e-3
max-steps: 3          # dashes, as in the flags, work too
batch_size: 8
max_length: 32
seed: 3
warmup_ratio: 0.2
weight_decay: 0.0
error_feedback: true
""")
    values = {"task": "mrpc", "model": str(tiny_model_dir), "data_dir": str(glue_dir), "optimizer": "umtam",
              "rank": 2, "lr": 1e-3, "max_steps": 3, "batch_size": 8, "max_length": 32, "seed": 3,
              "warmup_ratio": 0.2, "weight_decay": 0.0, "error_feedback": True}
    return path, values


def test_a_recipe_sets_every_option_it_names(recipe, tmp_path):
    path, values = recipe
    sidecar = train("--config", str(path), "-o", str(tmp_path / "from-recipe"))
    config = sidecar["training"]["config"]
    assert {key: config[key] for key in values} == values
    assert (config["beta1"], config["eval_batch_size"]) == (0.9, 64)  # what the recipe leaves out: defaults
    assert sidecar["steps"] == 3 and sidecar["seed"] == 3
    hp = sidecar["optimizer"]["hyperparameters"]
    assert (hp["rank"], hp["lr"], hp["weight_decay"], hp["error_feedback"]) == (2, 1e-3, 0.0, True)
    # the same run spelled out in flags trains the same weights
    flags = train("--task", "mrpc", "--model", values["model"], "--data-dir", values["data_dir"], "--optimizer",
                  "umtam", "--rank", "2", "--lr", "1e-3", "--max-steps", "3", "--batch-size", "8", "--max-length",
                  "32", "--seed", "3", "--warmup-ratio", "0.2", "--weight-decay", "0", "--error-feedback",
                  "-o", str(tmp_path / "from-flags"))
    assert flags["training"]["config"] == config
    assert flags["files"]["model.safetensors"]["sha256"] == sidecar["files"]["model.safetensors"]["sha256"]


def test_an_explicit_flag_wins_over_the_recipe(recipe, tmp_path):
    path, values = recipe
    sidecar = train("--config", str(path), "--seed", "5", "--rank", "3", "--lr", "2e-3", "--no-error-feedback",
                    "-o", str(tmp_path / "out"))
    config = sidecar["training"]["config"]
    assert (config["seed"], config["rank"], config["lr"], config["error_feedback"]) == (5, 3, 2e-3, False)
    # the recipe still sets everything no flag named
    assert (config["max_steps"], config["batch_size"], config["warmup_ratio"], config["optimizer"]) == (3, 8, 0.2,
                                                                                                        "umtam")
    hp = sidecar["optimizer"]["hyperparameters"]
    assert (hp["rank"], hp["lr"], hp["error_feedback"]) == (3, 2e-3, False)
    assert sidecar["seed"] == 5


# ----------------------------------------------------------------------------- UMTAM-only options


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_dir, glue_dir) -> dict:
    out = tmp_path_factory.mktemp("plain") / "run"
    return train(*tiny_run(tiny_model_dir, glue_dir), "-o", str(out)) | {"path": out}


def matrices(run: dict, only=lambda name: True) -> list[tuple[int, int]]:
    """(rows, columns) of the run's 2-D weights (every one UMTAM steps in low rank by default)."""
    weights = load_file(run["path"] / "model.safetensors")
    return [tuple(tensor.shape) for name, tensor in sorted(weights.items()) if tensor.dim() == 2 and only(name)]


def test_error_feedback_adds_one_dense_buffer_per_weight_matrix(plain, tmp_path, tiny_model_dir, glue_dir):
    out = tmp_path / "ef"
    ef = train(*tiny_run(tiny_model_dir, glue_dir), "--error-feedback", "-o", str(out)) | {"path": out}
    assert ef["training"]["config"]["error_feedback"] is True and plain["training"]["config"]["error_feedback"] is False
    assert ef["optimizer"]["hyperparameters"]["error_feedback"] is True
    assert plain["optimizer"]["hyperparameters"]["error_feedback"] is False
    # E: an fp32 m x n residual per 2-D weight, on top of the same low-rank state; the tracker is untouched
    extra = 4 * sum(m * n for m, n in matrices(plain))
    assert ef["optimizer"]["optimizer_bytes"] - plain["optimizer"]["optimizer_bytes"] == extra
    assert ef["optimizer"]["state_bytes"] - plain["optimizer"]["state_bytes"] == extra
    assert ef["optimizer"]["tracker_bytes"] == plain["optimizer"]["tracker_bytes"]
    assert ef["files"]["model.safetensors"]["sha256"] != plain["files"]["model.safetensors"]["sha256"]


def test_dense_embeddings_gives_the_embedding_matrices_adamw_moments(plain, tmp_path, tiny_model_dir, glue_dir):
    out = tmp_path / "dense"
    dense = train(*tiny_run(tiny_model_dir, glue_dir), "--dense-embeddings", "-o", str(out)) | {"path": out}
    assert dense["training"]["config"]["dense_embeddings"] is True
    assert plain["training"]["config"]["dense_embeddings"] is False
    embeddings = matrices(plain, only=lambda name: "embeddings." in name)
    assert len(embeddings) == 3  # word, position and token-type embeddings
    # per embedding matrix (m, n): exp_avg and exp_avg_sq (2 m n floats) replace U (m x r), V (n x r),
    # s (r), R (m) and C (n); the tracker now keeps its own R, C and step count for it
    dense_floats = sum(2 * m * n for m, n in embeddings)
    lowrank_floats = sum(RANK * (m + n) + RANK + m + n for m, n in embeddings)
    assert dense["optimizer"]["optimizer_bytes"] - plain["optimizer"]["optimizer_bytes"] == \
        4 * (dense_floats - lowrank_floats)
    assert dense["optimizer"]["tracker_bytes"] - plain["optimizer"]["tracker_bytes"] == \
        4 * sum(m + n + 1 for m, n in embeddings)
    assert dense["optimizer"]["state_bytes"] > plain["optimizer"]["state_bytes"]
    assert dense["files"]["model.safetensors"]["sha256"] != plain["files"]["model.safetensors"]["sha256"]


@pytest.mark.parametrize("flag, option", [("--error-feedback", "error_feedback"),
                                          ("--dense-embeddings", "dense_embeddings")])
def test_umtam_only_options_are_refused_for_adamw(flag, option, tmp_path, tiny_model_dir, glue_dir):
    args = tiny_run(tiny_model_dir, glue_dir)
    args[args.index("umtam")] = "adamw"
    code, stdout, stderr = run_cli("train", *args, flag, "-o", str(tmp_path / "out"))
    assert (code, stdout) == (2, "")
    assert stderr.startswith("umtam: error: ") and len(stderr.splitlines()) == 1
    assert f"{option} is an option of the umtam optimizer, not 'adamw'" in stderr


def test_dense_lr_is_refused_for_an_optimizer_that_keeps_nothing_apart(tmp_path, tiny_model_dir, glue_dir):
    args = tiny_run(tiny_model_dir, glue_dir)
    args[args.index("umtam")] = "adamw"
    code, stdout, stderr = run_cli("train", *args, "--dense-lr", "1e-5", "-o", str(tmp_path / "out"))
    assert (code, stdout) == (2, "") and len(stderr.splitlines()) == 1
    assert "dense_lr is an option of the galore, mofasgd, umtam optimizer, not 'adamw'" in stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out").exists()
