"""Periodic training states, --resume and the NaN stop, on the tiny model.

The central property: a run interrupted after its step-5 state and resumed
from it ends with the same weights, statistics and loss curve as a run never
interrupted, bit for bit, for every optimizer.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy
import pytest
import torch

from cli_runner import run_cli
from umtam import resume
from umtam.checkpoint import Checkpoint, load_checkpoint
from umtam.errors import CheckpointError
from umtam.optim import OPTIMIZERS, build_optimizer
from umtam.train import TrainConfig, train

TOTAL_STEPS = 12  # 24 tiny MRPC rows, batch 8: 3 steps per epoch, so states fall mid-epoch
SAVE_EVERY = 5
STOP_AFTER = 7


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The 2 cores are shared; one thread runs these tiny models several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupted(Exception):
    """Raised from the progress callback: the run stops as if killed, after the state it has written."""


def stop_after(step: int):
    def progress(kind, payload):
        if kind == "step" and payload.step == step:
            raise Interrupted
    return progress


def recording(steps: list[int]):
    def progress(kind, payload):
        if kind == "step":
            steps.append(payload.step)
    return progress


def tiny_config(tmp_path, model_dir, glue_dir, name: str, optimizer: str = "adamw", **overrides) -> TrainConfig:
    options = dict(task="mrpc", output=str(tmp_path / name), model=str(model_dir), data_dir=str(glue_dir),
                   optimizer=optimizer, rank=2, lr=1e-3, max_steps=TOTAL_STEPS, epochs=10, batch_size=8,
                   max_length=32, seed=7)
    return TrainConfig(**{**options, **overrides})


def interrupted_then_resumed(tmp_path, model_dir, glue_dir, optimizer: str) -> tuple[Checkpoint, list[int]]:
    config = tiny_config(tmp_path, model_dir, glue_dir, "resumed", optimizer, save_every=SAVE_EVERY)
    with pytest.raises(Interrupted):
        train(config, stop_after(STOP_AFTER))
    state_dir = tmp_path / "resumed-state"
    assert [path.name for path in resume.complete_states(state_dir)] == ["step-00000005"]
    assert not (tmp_path / "resumed").exists()
    steps: list[int] = []
    return train(config, recording(steps), resume_from=state_dir), steps


def assert_same_result(first: Checkpoint, second: Checkpoint) -> None:
    for load in (Checkpoint.load_tensors, Checkpoint.load_stats):
        a, b = load(first), load(second)
        assert a.keys() == b.keys()
        different = [key for key in a if not torch.equal(a[key], b[key])]
        assert different == []
    curve = first.sidecar.as_json()["training"]["loss_curve"]
    assert len(curve) == TOTAL_STEPS and second.sidecar.as_json()["training"]["loss_curve"] == curve
    assert first.sidecar.as_json()["steps"] == second.sidecar.as_json()["steps"] == TOTAL_STEPS


@pytest.mark.parametrize("optimizer", OPTIMIZERS.names())
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(optimizer, tmp_path, tiny_model_dir, glue_dir):
    reference = train(tiny_config(tmp_path, tiny_model_dir, glue_dir, "reference", optimizer))
    resumed, steps = interrupted_then_resumed(tmp_path, tiny_model_dir, glue_dir, optimizer)
    assert steps == list(range(SAVE_EVERY + 1, TOTAL_STEPS + 1))  # from the step-5 state, not from step 7
    assert_same_result(reference, resumed)
    assert resumed.sidecar.as_json()["training"]["resumed"] == [
        {"step": SAVE_EVERY, "state": str(tmp_path / "resumed-state" / "step-00000005"), "lr": 1e-3}]


@pytest.mark.parametrize("optimizer", ["umtam", "adamw"])
def test_dense_statistics_resume_bit_for_bit(optimizer, tmp_path, tiny_model_dir, glue_dir):
    # the trajectory's W0 copy and EMAs travel in the state, so a resumed run records the same statistics
    tracked = dict(track_fisher=True, track_trajectory=True)
    reference = train(tiny_config(tmp_path, tiny_model_dir, glue_dir, "reference", optimizer, **tracked))
    config = tiny_config(tmp_path, tiny_model_dir, glue_dir, "resumed", optimizer, save_every=SAVE_EVERY, **tracked)
    with pytest.raises(Interrupted):
        train(config, stop_after(STOP_AFTER))
    resumed = train(config, resume_from=tmp_path / "resumed-state")
    assert any(key.startswith("trajectory/") for key in resumed.load_stats())
    assert_same_result(reference, resumed)


def test_eval_every_on_a_glue_task_resumes_and_changes_no_weight(tmp_path, tiny_model_dir, glue_dir):
    reference = train(tiny_config(tmp_path, tiny_model_dir, glue_dir, "reference"))
    every = dict(eval_every=4)
    whole = train(tiny_config(tmp_path, tiny_model_dir, glue_dir, "whole", **every))
    assert_same_result(reference, whole)
    curve = whole.sidecar.as_json()["training"]["eval_curve"]
    assert [point["step"] for point in curve] == [4, 8, 12] and set(curve[0]["metrics"]) == {"validation"}
    assert set(curve[0]["metrics"]["validation"]) == {"f1", "accuracy"}
    config = tiny_config(tmp_path, tiny_model_dir, glue_dir, "resumed", save_every=SAVE_EVERY, **every)
    with pytest.raises(Interrupted):
        train(config, stop_after(STOP_AFTER))
    resumed = train(config, resume_from=tmp_path / "resumed-state")
    assert resumed.sidecar.as_json()["training"]["eval_curve"] == curve


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with dropout on, so the result depends on the torch RNG stream."""
    target = tmp_path_factory.mktemp("tiny-bert-dropout")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, target / path.name)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_resume_restores_the_rng_so_dropout_masks_continue(tmp_path, dropout_model_dir, glue_dir, monkeypatch):
    reference = train(tiny_config(tmp_path, dropout_model_dir, glue_dir, "reference"))
    resumed, _ = interrupted_then_resumed(tmp_path, dropout_model_dir, glue_dir, "adamw")
    assert_same_result(reference, resumed)
    # the control: without restoring the RNG the same resume draws other masks
    monkeypatch.setattr(resume, "restore_rng", lambda record, tensors: None)
    config = tiny_config(tmp_path, dropout_model_dir, glue_dir, "no-rng", save_every=SAVE_EVERY)
    unrestored = train(config, resume_from=tmp_path / "resumed-state" / "step-00000005")
    curve, expected = unrestored.sidecar.as_json()["training"]["loss_curve"], reference.sidecar.as_json()["training"]["loss_curve"]
    assert curve[:SAVE_EVERY] == expected[:SAVE_EVERY] and curve[SAVE_EVERY:] != expected[SAVE_EVERY:]


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), random.gauss(0.0, 1.0), numpy.random.rand(), numpy.random.randn()


def test_rng_state_round_trips_through_json_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    random.gauss(0.0, 1.0)
    numpy.random.randn()  # both now hold a cached Gaussian, which the state must carry too
    record, tensors = resume.capture_rng()
    save_file(tensors, str(tmp_path / "rng.safetensors"))
    record = json.loads(json.dumps(record))
    expected = draws()
    resume.restore_rng(record, {key[len("rng/"):]: value for key, value in
                                load_file(str(tmp_path / "rng.safetensors")).items()})
    assert draws() == expected


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_optimizer_state_round_trips_through_json_and_tensors(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))

    def build():
        return build_optimizer(name, list(model.named_parameters()), lr=1e-2, rank=2, weight_decay=0.01)

    optimizer = build()
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    record, tensors = resume.split_optimizer_state(optimizer.state_dict())
    restored = build()
    restored.load_state_dict(resume.join_optimizer_state(
        json.loads(json.dumps(record)), {key[len("optimizer/"):]: value.clone() for key, value in tensors.items()}))
    assert restored.param_groups == optimizer.param_groups  # tuples (betas, Adafactor's eps) stay tuples
    for p in model.parameters():
        saved, loaded = optimizer.state[p], restored.state[p]
        assert saved.keys() == loaded.keys()
        for key, value in saved.items():
            if isinstance(value, torch.Tensor):
                assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
            else:
                assert loaded[key] == value, key


def test_optimizer_state_with_an_object_is_refused():
    with pytest.raises(TypeError, match="tensors and numbers only"):
        resume.split_optimizer_state({"state": {0: {"projector": object()}}, "param_groups": []})


def test_a_new_peak_lr_keeps_the_schedule_shape():
    p = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([p], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    resume.rescale_peak_lr(optimizer, scheduler, 4e-4)
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0] == 4e-4 / 4
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 4e-4 / 5


# ----------------------------------------------------------------------------- through the CLI


def cli_train_args(model_dir, glue_dir, *extra: str) -> list[str]:
    return ["train", "--task", "mrpc", "--model", str(model_dir), "--data-dir", str(glue_dir),
            "--optimizer", "adamw", "--lr", "1e-3", "--max-steps", "8", "--batch-size", "8",
            "--max-length", "32", "--seed", "7", "--quiet", *extra]


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir, glue_dir):
    """A finished CLI run that saved a state every 2 of its 8 steps."""
    out = tmp_path_factory.mktemp("cli-resume") / "mrpc"
    code, _, stderr = run_cli(*cli_train_args(tiny_model_dir, glue_dir, "--save-every", "2", "-o", str(out)))
    assert code == 0, stderr
    return out, out.with_name("mrpc-state")


def test_states_keep_the_newest_two_and_hold_the_documented_parts(saved_run):
    _, state_dir = saved_run
    assert sorted(path.name for path in state_dir.iterdir()) == ["step-00000006", "step-00000008"]
    state = resume.find_state(state_dir)
    assert state.path.name == "step-00000008"
    assert {path.name for path in state.path.iterdir()} == {"state.safetensors", "umtam-state.json"}
    record = state.record
    # 8 steps of 3 batches per epoch: epoch 2, two of its batches used
    assert (record["step"], record["epoch"], record["batch"], record["total_steps"]) == (8, 2, 2, 8)
    assert len(record["loss_curve"]) == 8 and record["config"]["task"] == "mrpc" and "force" not in record["config"]
    assert record["optimizer"]["class"] == "AdamW" and record["scheduler"]["last_epoch"] == 8
    prefixes = {key.split("/", 1)[0] for key in resume.load_state_tensors(state)}
    assert prefixes == {"model", "optimizer", "tracker", "rng"}


def test_a_state_directory_is_not_a_checkpoint(saved_run):
    _, state_dir = saved_run
    for path in (state_dir, state_dir / "step-00000008"):
        with pytest.raises(CheckpointError, match="not a umtam checkpoint"):
            load_checkpoint(path)
    code, _, stderr = run_cli("inspect", str(state_dir))
    assert code == 1 and "not a umtam checkpoint" in stderr


def test_cli_resume_from_a_step_directory_writes_the_same_checkpoint(saved_run, tmp_path):
    out, state_dir = saved_run
    again = tmp_path / "again"
    code, _, stderr = run_cli("train", "--resume", str(state_dir / "step-00000006"), "-o", str(again), "--quiet")
    assert code == 0, stderr
    first = json.loads((out / "umtam.json").read_text())
    second = json.loads((again / "umtam.json").read_text())
    for name in ("model.safetensors", "stats.safetensors"):
        assert first["files"][name]["sha256"] == second["files"][name]["sha256"]
    assert second["training"]["loss_curve"] == first["training"]["loss_curve"]


@pytest.mark.parametrize("extra, code, message", [
    (["--optimizer", "umtam", "--seed", "8"], 2, "optimizer='umtam' (saved run: 'adamw'); seed=8 (saved run: 7)"),
    (["--max-steps", "9"], 2, "max_steps=9 (saved run: 8)"),
    ([], 2, "already exists"),  # the saved run's own output is finished: say where the new one goes
])
def test_resume_refuses_options_that_would_change_the_run(saved_run, tmp_path, extra, code, message):
    out, state_dir = saved_run
    target = ["-o", str(tmp_path / "new")] if extra else []
    got, _, stderr = run_cli("train", "--resume", str(state_dir), *extra, *target)
    assert got == code and message in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "new").exists()


def test_resume_of_a_checkpoint_or_nothing_is_refused(saved_run, tmp_path):
    out, _ = saved_run
    code, _, stderr = run_cli("train", "--resume", str(out), "-o", str(tmp_path / "new"))
    assert code == 1 and "a finished checkpoint, not a training state" in stderr
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli("train", "--resume", str(tmp_path / "empty"), "-o", str(tmp_path / "new"))
    assert code == 1 and "no complete training state" in stderr


def test_a_fresh_run_does_not_overwrite_another_runs_states(saved_run, tmp_path, tiny_model_dir, glue_dir):
    _, state_dir = saved_run
    before = sorted(path.name for path in state_dir.iterdir())
    code, _, stderr = run_cli(*cli_train_args(tiny_model_dir, glue_dir, "--save-every", "2",
                                              "--state-dir", str(state_dir), "-o", str(tmp_path / "new")))
    assert code == 2 and "already holds training states" in stderr and "--resume" in stderr
    assert sorted(path.name for path in state_dir.iterdir()) == before


# ----------------------------------------------------------------------------- NaN stop


def test_a_huge_lr_stops_with_one_line_naming_the_last_state(tmp_path, tiny_model_dir, glue_dir):
    out = tmp_path / "diverged"
    code, _, stderr = run_cli(*cli_train_args(tiny_model_dir, glue_dir, "--lr", "1e6", "--save-every", "1",
                                              "-o", str(out)))
    assert code == 1 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    state = resume.find_state(tmp_path / "diverged-state")
    assert "training diverged at step" in stderr and f"the last good state is {state.path}" in stderr
    assert f"umtam train --resume {tmp_path / 'diverged-state'} --lr 100000" in stderr
    assert not out.exists() and not list(tmp_path.glob(".diverged*"))
    tensors = resume.load_state_tensors(state)  # checks the sha256 recorded in the state
    assert all(torch.isfinite(value).all() for key, value in tensors.items() if key.startswith("model/"))


def nan_loss_at(step: int):
    """Wrap models.load_classifier so the model's training loss is NaN on its ``step``-th forward."""
    from umtam import models

    load = models.load_classifier

    def load_poisoned(*args, **kwargs):
        model = load(*args, **kwargs)
        forwards = []

        def poison(module, inputs, output):
            if module.training:
                forwards.append(1)
                if len(forwards) == step:
                    output["loss"] = output["loss"] * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    return load_poisoned


def test_nan_loss_keeps_the_last_state_and_a_lower_lr_continues_it(tmp_path, tiny_model_dir, glue_dir, monkeypatch):
    from umtam import models

    out, state_dir = tmp_path / "run", tmp_path / "run-state"
    monkeypatch.setattr(models, "load_classifier", nan_loss_at(4))
    code, _, stderr = run_cli(*cli_train_args(tiny_model_dir, glue_dir, "--save-every", "2", "-o", str(out)))
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert f"training diverged at step 4: loss is nan; the last good state is {state_dir / 'step-00000002'}" in stderr
    assert not out.exists()
    good_curve = resume.find_state(state_dir).record["loss_curve"]
    monkeypatch.undo()
    code, _, stderr = run_cli("train", "--resume", str(state_dir), "--lr", "5e-4", "--quiet")
    assert code == 0, stderr
    finished = load_checkpoint(out)
    training = finished.sidecar.as_json()["training"]
    assert finished.sidecar.as_json()["steps"] == 8 and training["config"]["lr"] == 5e-4
    assert training["resumed"] == [{"step": 2, "state": str(state_dir / "step-00000002"), "lr": 5e-4}]
    assert len(good_curve) == 2 and training["loss_curve"][:2] == good_curve
