"""The Hugging Face Trainer with umtam: the curvature callback, UMTAM as its optimizer, Adam's statistics imported."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")  # the Trainer needs it; umtam itself does not

from umtam.checkpoint import load_checkpoint  # noqa: E402
from umtam.errors import CheckpointError  # noqa: E402
from umtam.integrations import (UMTAM_SUBDIR, adam_statistics, curvature_callback, read_optimizer_state,  # noqa: E402
                                trainer_parameter_order)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    """Sequences with a learnable rule (each token is the previous plus one), so the loss can fall."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        start = torch.randint(2, 20, (1,), generator=torch.Generator().manual_seed(index))
        ids = (start + torch.arange(12)) % 38 + 2
        return {"input_ids": ids, "labels": ids}


def run_trainer(tmp_path, *, steps: int, callbacks=(), optimizers=(None, None), lr: float = 5e-3, model=None,
                optim: str = "adamw_torch"):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8,
                             learning_rate=lr, save_steps=steps, report_to=[], use_cpu=True, logging_steps=1,
                             seed=0, data_seed=0, max_grad_norm=1.0, disable_tqdm=True, optim=optim)
    trainer = Trainer(model=model or tiny_llama(), args=args, train_dataset=Tokens(), callbacks=list(callbacks),
                      optimizers=optimizers)
    trainer.train()
    return trainer


def test_adams_second_moment_is_the_trackers_curvature_on_the_same_gradients(tmp_path):
    trainer = run_trainer(tmp_path, steps=5, callbacks=[curvature_callback("lm:tokens", beta2=0.999)])
    folder = tmp_path / "out" / "checkpoint-5"
    imported = adam_statistics(read_optimizer_state(folder / "optimizer.pt"), trainer_parameter_order(trainer.model),
                               keep_full=True)
    tracked = load_checkpoint(folder / UMTAM_SUBDIR).load_stats()
    factored = {key: value for key, value in imported.items() if not key.startswith("fisher/")}
    assert set(factored) == set(tracked) and len(tracked) == 2 * 9 + 3  # 9 matrices (lm_head untied), 3 norm vectors
    for key, value in tracked.items():
        torch.testing.assert_close(factored[key], value, rtol=2e-5, atol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert imported[f"fisher/{q}"].shape == (16, 16)
    torch.testing.assert_close(imported[f"fisher/{q}"].mean(dim=1), imported[f"exp_avg_sq_row/{q}"])


def test_the_callback_writes_a_umtam_checkpoint_at_each_save(tmp_path):
    run_trainer(tmp_path, steps=4, callbacks=[curvature_callback("lm:tokens")])
    checkpoint = load_checkpoint(tmp_path / "out" / "checkpoint-4" / UMTAM_SUBDIR)
    sidecar = checkpoint.sidecar.as_json()
    assert sidecar["kind"] == "train" and sidecar["steps"] == 4 and sidecar["lineage"]["operation"] == "hf-trainer"
    assert sidecar["optimizer"]["name"] == "AdamW" and sidecar["stats"]["tracked_steps"] == 4
    weights = checkpoint.load_tensors()
    assert "model.layers.0.mlp.down_proj.weight" in weights and "config.json" in sidecar["files"]


@pytest.mark.slow  # a real Trainer run: about 10 s
def test_umtam_is_a_trainer_optimizer_and_the_loss_falls(tmp_path):
    from umtam.optim import UMTAM

    model = tiny_llama()
    optimizer = UMTAM(model.parameters(), lr=2e-2, rank=2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = run_trainer(tmp_path, steps=20, optimizers=(optimizer, scheduler), model=model)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_a_state_that_is_not_adams_is_refused_in_one_line(tmp_path):
    model = tiny_llama()
    named = trainer_parameter_order(model)
    sgd = torch.optim.SGD([p for _, p in named], lr=0.1, momentum=0.9)
    model(torch.tensor([[2, 3, 4]]), labels=torch.tensor([[2, 3, 4]])).loss.backward()
    sgd.step()
    with pytest.raises(CheckpointError, match="no \\(beta1, beta2\\): not an Adam-like optimizer"):
        adam_statistics(sgd.state_dict(), named)
    torch.save({"not": "an optimizer"}, tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="not an optimizer state_dict"):
        read_optimizer_state(tmp_path / "optimizer.pt")


def trainer_checkpoint(tmp_path, name: str, seed: int, **args):
    """A Trainer run from the saved base (tiny Llama, seed 0) and its checkpoint-5 directory."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    torch.manual_seed(seed)
    run_trainer(tmp_path / name, steps=5, model=model, lr=1e-3, **args)
    return tmp_path / name / "out" / "checkpoint-5"


@pytest.fixture
def trainer_runs(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path, [trainer_checkpoint(tmp_path, f"run{i}", seed=i) for i in (1, 2)]


def test_curvature_methods_merge_trainer_checkpoints_through_their_optimizer_state(trainer_runs):
    from cli_runner import run_cli

    root, runs = trainer_runs
    for method in ("ota", "umtam", "fisher"):
        code, _, stderr = run_cli("merge", *map(str, runs), "--base", str(root / "base"), "--method", method,
                                  "-o", str(root / method), "--quiet")
        assert code == 0, stderr
        merged = load_checkpoint(root / method)
        # Trainer checkpoints are all checkpoint-5: their runs name them apart
        assert set(merged.tasks) == {"lm:run1-out-checkpoint-5", "lm:run2-out-checkpoint-5"}
        inputs = merged.sidecar.lineage.as_json()["inputs"]
        assert all(item["format"] == "huggingface" for item in inputs)


def test_a_trainer_checkpoint_of_a_non_adam_optimizer_is_refused_by_a_curvature_method(tmp_path):
    from cli_runner import run_cli

    tiny_llama().save_pretrained(tmp_path / "base")
    adam = trainer_checkpoint(tmp_path, "adam", seed=1)
    sgd = trainer_checkpoint(tmp_path, "sgd", seed=2, optim="sgd")
    code, _, stderr = run_cli("merge", str(adam), str(sgd), "--base", str(tmp_path / "base"), "--task-names",
                              "lm:adam,lm:sgd", "--method", "ota", "-o", str(tmp_path / "m"))
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "optimizer.pt" in stderr and "not an Adam-like optimizer" in stderr
    assert not (tmp_path / "m").exists()
