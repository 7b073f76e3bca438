"""Decoder LMs end to end: train --task lm/sft, tied weights saved once, eval's perplexity, GLUE on a decoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from lm_fixtures import write_text_corpus, write_tiny_decoder
from umtam.checkpoint import load_checkpoint
from umtam.config.train import TrainConfig
from umtam.errors import ConfigError
from umtam.evaluate import evaluate_checkpoint
from umtam.safetensors_io import tensor_shapes
from umtam.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text_corpus(tmp_path_factory.mktemp("text") / "stories")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_decoder(tmp_path_factory.mktemp("models") / "llama", "llama", tie=True)


def lm_config(model, corpus, out, **overrides):
    fields = {"task": "lm", "model": str(model), "data": str(corpus / "train.txt"),
              "eval_data": str(corpus / "validation.jsonl"), "optimizer": "umtam", "rank": 2, "max_steps": 6,
              "batch_size": 2, "max_length": 16, "lr": 1e-2, "output": str(out), **overrides}
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, llama_dir, corpus):
    return train(lm_config(llama_dir, corpus, tmp_path_factory.mktemp("runs") / "lm"))


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_each_decoder_family_trains_as_a_causal_lm_and_saves_its_tied_embedding_once(tmp_path, corpus, family):
    from transformers import AutoModelForCausalLM

    model_dir = write_tiny_decoder(tmp_path / family, family, tie=True)
    checkpoint = train(lm_config(model_dir, corpus, tmp_path / "out", max_steps=3))
    names = set(tensor_shapes(checkpoint.model_file))
    assert "lm_head.weight" not in names  # the alias of the token embedding, which is stored
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint.path)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    stored = checkpoint.load_tensors()
    for name, tensor in loaded.state_dict().items():
        if name in stored:
            torch.testing.assert_close(tensor, stored[name], rtol=0, atol=0)
    stats = set(load_checkpoint(checkpoint.path).load_stats())
    assert not any(key.endswith("/lm_head.weight") for key in stats)  # named once, as the embedding


def test_the_sidecar_records_the_text_and_token_weighted_validation(lm_run, corpus):
    (key, record), = lm_run.sidecar.tasks.items()
    assert key == "lm:stories" and record.label_names == [] and not record.is_regression
    validation = record.metrics["validation"]
    assert validation["perplexity"] == pytest.approx(math.exp(validation["loss"]))
    # two short documents, each followed by eos, packed into one block: 7 + 7 tokens, 13 predicted
    assert validation["tokens"] == 13
    fields = record.as_json()
    assert fields["data_source"] == str((corpus / "train.txt").resolve())
    assert fields["eval_data"] == str((corpus / "validation.jsonl").resolve())
    assert lm_run.sidecar.base_model.architecture == "causal-lm"


def test_eval_repeats_the_training_runs_validation_and_scores_other_text(lm_run, corpus):
    recorded = lm_run.sidecar.tasks["lm:stories"].metrics["validation"]
    again = evaluate_checkpoint(lm_run, task="lm")["lm:stories"]
    assert again["splits"]["validation"] == pytest.approx(recorded, rel=1e-6)
    assert again["score"] == pytest.approx(recorded["perplexity"])
    other = evaluate_checkpoint(lm_run, task="lm", data=str(corpus / "train.txt"))
    (key, result), = other.items()
    assert key == "lm:stories" and result["splits"]["data"]["tokens"] > 100 and result["normalized"] is None


def test_eval_scores_other_weights_on_the_checkpoints_own_rows(lm_run, llama_dir):
    from umtam import models
    from umtam.objectives import language
    from umtam.tasks import task_spec
    from umtam.weights import model_tensors

    source = models.resolve_model(str(llama_dir))
    pretrained = models.load_causal_lm(source)  # what lm_run was fine-tuned from
    scored = evaluate_checkpoint(lm_run, task="lm", weights=model_tensors(pretrained))["lm:stories"]
    # the reference: the pretrained model as transformers loads it, on the validation blocks the run recorded
    tokenizer = models.load_tokenizer(source)
    features = language.validation_features(task_spec("lm"), lm_run.tasks["lm:stories"], tokenizer, 16)
    expected = language.evaluate(pretrained, features, "lm:stories", pad_token_id=tokenizer.pad_token_id)
    assert scored["splits"]["validation"] == pytest.approx(expected, rel=1e-6)
    trained = lm_run.sidecar.tasks["lm:stories"].metrics["validation"]
    assert expected["tokens"] == trained["tokens"] and expected["loss"] > trained["loss"]  # six steps learned


def test_eval_scores_blocks_as_long_as_training_validated_unless_told(tmp_path, llama_dir, corpus):
    run = train(lm_config(llama_dir, corpus, tmp_path / "short", max_length=8, max_steps=2))
    recorded = run.sidecar.tasks["lm:stories"].metrics["validation"]
    assert recorded["tokens"] == 7  # 14 validation tokens: one full block of 8 (the short tail is not a block)
    again = evaluate_checkpoint(run, task="lm")["lm:stories"]["splits"]["validation"]
    assert again == pytest.approx(recorded, rel=1e-6)
    longer = evaluate_checkpoint(run, task="lm", max_length=16)["lm:stories"]["splits"]["validation"]
    assert longer["tokens"] == 13  # one block


def test_eval_of_a_merge_normalises_perplexity_by_the_experts_on_its_own_text(tmp_path, lm_run, llama_dir):
    other_text = tmp_path / "other"
    other_text.mkdir()
    (other_text / "train.txt").write_text("a dog likes a bird . the bird sees a cat .\n" * 20)
    (other_text / "validation.txt").write_text("the dog likes a cat .\n")
    second = train(lm_config(llama_dir, other_text, tmp_path / "second", data=str(other_text / "train.txt"),
                             eval_data=str(other_text / "validation.txt"), seed=3))
    code, _, stderr = run_cli("merge", str(lm_run.path), str(second.path), "--method", "task-arithmetic",
                              "--lambda", "0.5", "-o", str(tmp_path / "merged"), "--quiet")
    assert code == 0, stderr
    merged = load_checkpoint(tmp_path / "merged")
    assert set(merged.tasks) == {"lm:stories", "lm:other"}
    assert "lm_head.weight" not in tensor_shapes(merged.model_file)
    results = evaluate_checkpoint(merged, task="lm")
    for key, result in results.items():
        expert = merged.tasks[key].expert_metrics["validation"]["perplexity"]
        assert result["normalized"] == pytest.approx(expert / result["score"])
    code, out, stderr = run_cli("eval", str(tmp_path / "merged"), "--task", "lm", "--json")
    assert code == 0, stderr
    assert json.loads(out)["score_is"] == "perplexity"


def test_sft_trains_on_the_responses_only(tmp_path, llama_dir):
    from umtam.lm_data import IGNORE_INDEX

    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"prompt": "what is two plus two ?", "response": "four ."}\n' * 6
                     + '{"messages": [{"role": "user", "content": "hello how are you ?"}, '
                       '{"role": "assistant", "content": "fine thanks ."}]}\n' * 6)
    checkpoint = train(TrainConfig(task="sft", model=str(llama_dir), data=str(chats), holdout_fraction=0.25,
                                   max_steps=4, batch_size=2, max_length=32, lr=1e-2, output=str(tmp_path / "sft")))
    (key, record), = checkpoint.sidecar.tasks.items()
    assert key == "sft:chats" and record.as_json()["eval_holdout_fraction"] == 0.25
    # every validation conversation scores its response tokens alone: "four ." or "fine thanks ." plus <|end|>
    tokens = record.metrics["validation"]["tokens"]
    assert tokens in range(3 * 3, 4 * 3 + 1)
    from umtam.lm_data import sft_features
    from umtam.models import load_tokenizer, resolve_model

    features = sft_features([[{"role": "user", "content": "what is two plus two ?"},
                              {"role": "assistant", "content": "four ."}]],
                            load_tokenizer(resolve_model(str(llama_dir))), 32)
    targets = [label for label in features[0]["labels"] if label != IGNORE_INDEX]
    assert len(targets) == 3  # "four", ".", "<|end|>"


def test_a_run_from_scratch_rebuilds_its_base_from_the_config_and_seed(tmp_path, corpus):
    from umtam.base_model import fingerprint, load_base_encoder

    source = write_tiny_decoder(tmp_path / "gpt2", "gpt2")
    config_only = tmp_path / "gpt2-config"
    config_only.mkdir()
    (config_only / "config.json").write_text((source / "config.json").read_text())
    checkpoint = train(lm_config(config_only, corpus, tmp_path / "scratch", from_scratch=True,
                                 tokenizer=str(source), max_steps=3, seed=5))
    base = checkpoint.sidecar.base_model
    assert base.from_config and base.init_seed == 5
    rebuilt = load_base_encoder(base, keys=list(tensor_shapes(checkpoint.model_file)))
    assert fingerprint(rebuilt) == base.fingerprint
    code, _, stderr = run_cli("prune", str(checkpoint.path), "--keep", "0.5", "-o", str(tmp_path / "pruned"),
                              "--quiet")
    assert code == 0, stderr


def test_a_glue_task_on_a_decoder_gets_a_score_head(tmp_path, llama_dir, glue_dir):
    checkpoint = train(TrainConfig(task="rte", model=str(llama_dir), data_dir=str(glue_dir), max_steps=2,
                                   batch_size=4, output=str(tmp_path / "rte")))
    shapes = tensor_shapes(checkpoint.model_file)
    assert shapes["score.weight"] == (2, 16) and "lm_head.weight" not in shapes
    config = json.loads((checkpoint.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 2
    result = evaluate_checkpoint(checkpoint, task="rte", data_dir=str(glue_dir))
    assert result["rte"]["splits"]["validation"] == checkpoint.sidecar.tasks["rte"].metrics["validation"]


def whole_and_resumed(tmp_path, llama_dir, corpus, stop: int, **options):
    """The same run straight through, and stopped after ``stop`` steps (a state saved there) then resumed."""
    whole = train(lm_config(llama_dir, corpus, tmp_path / "whole", **options))
    part = lm_config(llama_dir, corpus, tmp_path / "part", save_every=stop, **options)
    with pytest.raises(SystemExit):
        _stop_after(stop, lambda progress: train(part, progress=progress))
    return whole, train(part, resume_from=tmp_path / "part-state")


def test_resuming_an_lm_run_is_bit_identical_on_cpu(tmp_path, llama_dir, corpus):
    whole, resumed = whole_and_resumed(tmp_path, llama_dir, corpus, 3, max_steps=6)
    assert resumed.sidecar.training.loss_curve == whole.sidecar.training.loss_curve
    for name, tensor in whole.load_tensors().items():
        assert torch.equal(tensor, resumed.load_tensors()[name]), name


def _stop_after(steps: int, run):
    """Run until the progress callback has seen ``steps`` optimizer steps (and the state saved), then stop."""
    def progress(kind, payload):
        if kind == "step" and payload.step == steps:
            raise SystemExit

    run(progress)


def test_bf16_autocast_trains_on_a_cpu_with_native_bf16(tmp_path, llama_dir, corpus):
    from umtam.precision import cpu_supports_bf16

    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bfloat16")
    checkpoint = train(lm_config(llama_dir, corpus, tmp_path / "bf16", dtype="bf16", max_steps=4))
    assert checkpoint.sidecar.training.config["dtype"] == "bf16"
    # fp32 master weights: the checkpoint holds float32 tensors whatever the compute dtype
    assert {tensor.dtype for tensor in checkpoint.load_tensors().values()} == {torch.float32}
    fp32 = train(lm_config(llama_dir, corpus, tmp_path / "fp32", max_steps=4))
    bf16_loss, fp32_loss = checkpoint.sidecar.training.loss_curve, fp32.sidecar.training.loss_curve
    assert bf16_loss != fp32_loss and bf16_loss == pytest.approx(fp32_loss, rel=0.05)


def test_a_bf16_base_is_fingerprinted_as_stored_and_trained_in_fp32(tmp_path, corpus):
    from umtam.base_model import fingerprint, read_base_file
    from umtam.models import resolve_model

    model_dir = write_tiny_decoder(tmp_path / "bf16-llama", "llama", dtype=torch.bfloat16)
    checkpoint = train(lm_config(model_dir, corpus, tmp_path / "out", max_steps=2))
    stored = read_base_file(resolve_model(str(model_dir)), list(tensor_shapes(checkpoint.model_file)))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert fingerprint(stored) == checkpoint.sidecar.base_model.fingerprint
    assert {t.dtype for t in checkpoint.load_tensors().values()} == {torch.float32}


def test_fp16_loss_scaling_skips_an_overflowed_step_and_lowers_the_scale():
    from umtam.precision import precision_for

    precision = precision_for("fp16", torch.device("cpu"), scaler_device="cpu")
    scaler = precision.scaler
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scale = scaler.get_scale()
    scaler.scale((weight * torch.tensor([float("inf"), 1.0, 1.0])).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(3)) and scaler.get_scale() == scale * 0.5


@pytest.mark.parametrize("dtype, device, patch, message", [
    ("fp16", "cpu", False, "--dtype fp16 needs a CUDA device"),
    ("bf16", "cpu", True, "--dtype bf16: this CPU has no native bfloat16"),
])
def test_a_dtype_the_device_cannot_run_is_refused_before_any_work(tmp_path, monkeypatch, llama_dir, corpus,
                                                                  dtype, device, patch, message):
    from umtam.errors import ConfigError

    if patch:
        monkeypatch.setattr("umtam.precision.cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError, match=message):
        train(lm_config(llama_dir, corpus, tmp_path / "out", dtype=dtype, device=device))
    assert not (tmp_path / "out").exists()


def test_eval_every_records_validation_loss_on_the_held_out_text_and_changes_nothing(tmp_path, llama_dir, corpus,
                                                                                      lm_run):
    run = train(lm_config(llama_dir, corpus, tmp_path / "every", eval_every=2))
    curve = run.sidecar.as_json()["training"]["eval_curve"]
    assert [point["step"] for point in curve] == [2, 4, 6]
    final = run.sidecar.as_json()["tasks"]
    (record,) = final.values()
    # the step-6 point is the final validation (same model, same blocks): it must agree exactly
    assert curve[-1]["metrics"] == record["metrics"]
    assert all(set(point["metrics"]["validation"]) >= {"loss", "perplexity", "tokens"} for point in curve)
    assert curve[0]["metrics"]["validation"]["loss"] != curve[-1]["metrics"]["validation"]["loss"]
    for name, tensor in lm_run.load_tensors().items():  # the same run without --eval-every
        assert torch.equal(tensor, run.load_tensors()[name]), name
    assert run.sidecar.training.loss_curve == lm_run.sidecar.training.loss_curve


@pytest.mark.slow  # the GLUE case of the same property runs by default (test_resume.py)
def test_eval_every_points_survive_a_resume(tmp_path, llama_dir, corpus):
    whole, resumed = whole_and_resumed(tmp_path, llama_dir, corpus, 4, eval_every=2)
    assert resumed.sidecar.as_json()["training"]["eval_curve"] == whole.sidecar.as_json()["training"]["eval_curve"]


def _documents(root: Path, count: int) -> Path:
    sentences = ["the cat sees a bird .", "the dog likes the cat .", "a bird sees the dog ."]
    path = root / "docs.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{sentences[i % 3]} {sentences[(i + 1) % 3]}"}) + "\n"
                            for i in range(count)))
    return path


def _kept_whole(checkpoint, out: Path):
    """The checkpoint pruned at keep 1.0: the same weights, its scores kept as the expert's (what eval normalises by)."""
    code, _, stderr = run_cli("prune", str(checkpoint.path), "--keep", "1.0", "-o", str(out), "--quiet")
    assert code == 0, stderr
    return load_checkpoint(out)


def test_eval_normalises_only_on_the_rows_the_expert_was_scored_on(tmp_path, llama_dir, corpus):
    # 14 validation tokens in blocks of 4: three blocks, of which the expert scored two (seed 3's)
    run = train(lm_config(llama_dir, corpus, tmp_path / "capped", max_length=4, max_steps=2, max_eval_samples=2, seed=3))
    whole = _kept_whole(run, tmp_path / "whole")
    same = evaluate_checkpoint(whole, task="lm", max_eval_samples=2, seed=3)["lm:stories"]
    assert same["splits"]["validation"]["tokens"] == run.sidecar.tasks["lm:stories"].metrics["validation"]["tokens"]
    assert same["normalized"] == pytest.approx(1.0, rel=1e-5)  # the expert against itself, on its own rows
    every = evaluate_checkpoint(whole, task="lm")["lm:stories"]  # all three blocks: another sample
    assert every["splits"]["validation"]["tokens"] > same["splits"]["validation"]["tokens"]
    assert every["normalized"] is None


def test_a_holdout_slice_other_than_the_experts_is_refused(tmp_path, llama_dir):
    data = _documents(tmp_path / "text", 20)
    run = train(lm_config(llama_dir, data.parent, tmp_path / "held", data=str(data), eval_data=str(data),
                          holdout_fraction=0.1, max_steps=2))
    with pytest.raises(ConfigError, match=r"held out 0\.1 of its text; --holdout-fraction 0\.3 would score rows it "
                                          r"trained on"):
        evaluate_checkpoint(run, task="lm", holdout_fraction=0.3)
    assert evaluate_checkpoint(run, task="lm", holdout_fraction=0.1)["lm:docs"]["splits"]["holdout"]["tokens"] > 0


def test_an_expert_validated_on_its_holdout_normalises_a_holdout_eval(tmp_path, llama_dir):
    data = _documents(tmp_path / "text", 20)
    run = train(lm_config(llama_dir, data.parent, tmp_path / "self", data=str(data), eval_data=None,
                          holdout_fraction=0.2, max_steps=2))
    whole = _kept_whole(run, tmp_path / "whole")
    held = evaluate_checkpoint(whole, task="lm", holdout_fraction=0.2)["lm:docs"]
    assert held["normalized"] == pytest.approx(1.0, rel=1e-5)  # its validation rows are this holdout slice
