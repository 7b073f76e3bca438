"""Hugging Face interop on the tiny model: transformers loads what umtam writes, umtam merges what transformers saves.

- trained and pruned checkpoints load with from_pretrained and score what umtam measured;
- a merged checkpoint loads one task's head with the two lines of README "Hugging Face interop";
- a plain Hugging Face directory is a merge input under the rule of umtam.hf_interop.
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_runner import run_cli
from test_merge_engine import in_memory_merge
from umtam import data, metrics
from umtam.checkpoint import load_checkpoint
from umtam.evaluate import build_task_model, evaluate_checkpoint
from umtam.hf_interop import open_plain_hf, task_configs
from umtam.base_model import load_base_encoder
from umtam.heads import encoder_tensors

MAX_LENGTH = 32


def dev_examples(task, glue_dir):
    return data.load_task(task, data_dir=glue_dir, need_train=False).eval["validation"]


def hf_batch(tokenizer, examples):
    pairs = [ex.text_b for ex in examples] if examples[0].text_b is not None else None
    return tokenizer([ex.text_a for ex in examples], pairs, truncation=True, max_length=MAX_LENGTH,
                     padding=True, return_tensors="pt")


def logits_of(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def hf_metrics(task, logits, examples):
    return metrics.compute_metrics(task, logits.argmax(-1).tolist(), [ex.label for ex in examples])


def load_task_head(directory, task):
    """The two lines of README "Hugging Face interop"."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(f"{directory}/config.{task}.json")
    return AutoModelForSequenceClassification.from_pretrained(directory, config=config,
                                                              key_mapping={f"^heads/{task}/": ""})


def save_plain_model(directory, base_dir, *, seed, scale=0.002, finetuning_task=None, num_labels=2):
    """A "fine-tuned" plain transformers directory: the base plus seeded noise, its own head, no tokenizer."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    model.config.finetuning_task = finetuning_task
    model.save_pretrained(directory)  # safetensors: the only format umtam reads
    assert (directory / "model.safetensors").is_file() and not (directory / "pytorch_model.bin").exists()
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, glue_dir):
    from umtam.train import TrainConfig, train

    config = TrainConfig(task="mrpc", output=str(tmp_path_factory.mktemp("hf") / "mrpc"), model=str(tiny_model_dir),
                         optimizer="umtam", rank=2, lr=1e-3, epochs=1, batch_size=8, max_length=MAX_LENGTH,
                         seed=3, data_dir=str(glue_dir))
    return train(config)


@pytest.fixture(scope="module")
def pruned(trained, tmp_path_factory):
    from umtam.prune import write_pruned

    checkpoint, _ = write_pruned(trained, tmp_path_factory.mktemp("hf") / "mrpc-30pct", keep=0.3)
    return checkpoint


@pytest.fixture(scope="module")
def plain_sst2(tmp_path_factory, tiny_model_dir):
    return save_plain_model(tmp_path_factory.mktemp("hf") / "sst2-plain", tiny_model_dir, seed=11)


@pytest.fixture(scope="module")
def merged(plain_sst2, trained, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "merged"
    code, stdout, stderr = run_cli("merge", str(plain_sst2), str(trained.path), "--method", "ties",
                                   "--base", str(tiny_model_dir), "--task-names", "sst2", "-o", str(out),
                                   "--json", "--quiet")
    assert code == 0, stderr
    assert json.loads(stdout)["tasks"] == ["sst2", "mrpc"]
    return load_checkpoint(out)


# ----------------------------------------------------------------------------- trained and pruned


@pytest.mark.parametrize("which", ["trained", "pruned"])
def test_trained_and_pruned_checkpoints_load_in_transformers_and_score_the_same(which, request, glue_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    checkpoint = request.getfixturevalue(which)
    theirs = AutoModelForSequenceClassification.from_pretrained(checkpoint.path)
    ours = build_task_model(checkpoint, "mrpc", checkpoint.load_tensors())
    examples = dev_examples("mrpc", glue_dir)
    batch = hf_batch(AutoTokenizer.from_pretrained(checkpoint.path), examples)
    their_logits = logits_of(theirs, batch)
    assert torch.allclose(their_logits, logits_of(ours, batch), atol=1e-5, rtol=0)
    assert theirs.config.id2label == {0: "not_equivalent", 1: "equivalent"}

    measured = evaluate_checkpoint(checkpoint, task="mrpc", data_dir=glue_dir, max_length=MAX_LENGTH)
    assert hf_metrics("mrpc", their_logits, examples) == measured["mrpc"]["splits"]["validation"]
    if which == "trained":  # a pruned sidecar keeps its input's metrics; eval measures the pruned model
        assert measured["mrpc"]["splits"]["validation"] == checkpoint.tasks["mrpc"].as_json()["metrics"]["validation"]


def test_the_pruned_checkpoint_is_not_the_trained_one(trained, pruned):
    before, after = trained.load_tensors(), pruned.load_tensors()
    assert not torch.equal(before["bert.encoder.layer.0.attention.self.query.weight"],
                           after["bert.encoder.layer.0.attention.self.query.weight"])
    assert pruned.sidecar.as_json()["lineage"]["kept_fraction"] == pytest.approx(0.3, abs=0.01)


# ----------------------------------------------------------------------------- merged


def test_merged_checkpoint_loads_each_task_head_with_the_documented_two_lines(merged, glue_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged.path)
    tensors = merged.load_tensors()
    measured = evaluate_checkpoint(merged, task="glue", data_dir=glue_dir, max_length=MAX_LENGTH)
    for task in ("sst2", "mrpc"):
        theirs = load_task_head(merged.path, task)
        assert theirs.config.id2label == dict(enumerate(merged.tasks[task].as_json()["label_names"]))
        assert torch.equal(theirs.classifier.weight, tensors[f"heads/{task}/classifier.weight"])
        examples = dev_examples(task, glue_dir)
        batch = hf_batch(tokenizer, examples)
        their_logits = logits_of(theirs, batch)
        ours = build_task_model(merged, task, tensors)
        assert torch.allclose(their_logits, logits_of(ours, batch), atol=1e-5, rtol=0)
        assert hf_metrics(task, their_logits, examples) == measured[task]["splits"]["validation"]


def test_merged_encoder_loads_with_automodel(merged):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(merged.path).state_dict()
    tensors = merged.load_tensors()
    for key, value in encoder_tensors(tensors).items():
        if not key.startswith("heads/"):
            assert torch.equal(encoder[key.removeprefix("bert.")], value), key


def test_task_configs_carry_labels_and_regression(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "bert", "architectures": ["BertForSequenceClassification"], "hidden_size": 8,
        "id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}, "finetuning_task": "mrpc",
    }))
    files = task_configs(tmp_path / "config.json", {
        "mnli": {"label_names": ["entailment", "neutral", "contradiction"], "is_regression": False},
        "stsb": {"label_names": [], "is_regression": True},
    })
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    mnli = AutoConfig.from_pretrained(tmp_path / "config.mnli.json")
    assert mnli.num_labels == 3 and mnli.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert mnli.problem_type == "single_label_classification" and mnli.finetuning_task == "mnli"
    assert mnli.architectures == ["BertForSequenceClassification"]
    stsb = AutoConfig.from_pretrained(tmp_path / "config.stsb.json")
    assert stsb.num_labels == 1 and stsb.problem_type == "regression"


# ----------------------------------------------------------------------------- plain inputs


def test_plain_input_merges_like_a_checkpoint_with_ties(merged, plain_sst2, trained, tiny_model_dir):
    plain = open_plain_hf(plain_sst2, "sst2")
    base = load_base_encoder(trained.sidecar.as_json()["base_model"], override=str(tiny_model_dir))
    expected = in_memory_merge([plain, trained], "ties", {}, base)
    tensors = merged.load_tensors()
    assert expected.keys() == {key for key in tensors if not key.startswith("heads/")}
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    from safetensors.torch import load_file

    own = load_file(str(plain_sst2 / "model.safetensors"))
    for key in ("classifier.weight", "classifier.bias"):
        assert torch.equal(tensors[f"heads/sst2/{key}"], own[key])  # the plain input's head, as it was


def test_plain_input_is_recorded_in_the_lineage(merged, plain_sst2, trained):
    sidecar = merged.sidecar.as_json()
    first, second = sidecar["lineage"]["inputs"]
    assert first["format"] == "huggingface" and first["tasks"] == ["sst2"]
    assert first["base_check"]["fingerprint"] is False
    # the base's weights are drawn with std 0.02 and the noise has std 0.002
    assert first["base_check"]["relative_distance"] == pytest.approx(0.1, rel=0.1)
    assert "format" not in second
    assert sidecar["base_model"] == trained.sidecar.as_json()["base_model"]
    assert sidecar["tasks"]["sst2"]["label_names"] == ["negative", "positive"]
    assert sidecar["tasks"]["sst2"]["expert_metrics"] == {}
    assert {"config.json", "config.sst2.json", "config.mrpc.json", "tokenizer.json"} <= set(sidecar["files"])


def test_merge_of_plain_inputs_only_takes_its_base_record_from_base(tmp_path, tiny_model_dir, plain_sst2,
                                                                      trained, glue_dir):
    rte = save_plain_model(tmp_path / "rte-plain", tiny_model_dir, seed=12, finetuning_task="rte")
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", str(plain_sst2), str(rte), "--method", "task-arithmetic", "--base",
                              str(tiny_model_dir), "--task-names", "sst2,rte", "-o", str(out), "--quiet")
    assert code == 0, stderr
    merged = load_checkpoint(out)
    # the same fingerprint umtam train recorded for this base: later prunes and merges find and check it
    assert merged.sidecar.as_json()["base_model"]["fingerprint"] == trained.sidecar.as_json()["base_model"]["fingerprint"]
    assert "tokenizer.json" in merged.sidecar.as_json()["files"]  # neither input has one: taken from --base
    code, stdout, stderr = run_cli("eval", str(out), "--task", "glue", "--data-dir", str(glue_dir),
                                   "--max-length", str(MAX_LENGTH), "--json")
    assert code == 0, stderr
    assert set(json.loads(stdout)["tasks"]) == {"sst2", "rte"}


def test_task_name_comes_from_finetuning_task(tmp_path, tiny_model_dir):
    plain = open_plain_hf(save_plain_model(tmp_path / "p", tiny_model_dir, seed=3, finetuning_task="SST-2"))
    assert list(plain.tasks) == ["sst2"]
    assert plain.stats_file is None and plain.sidecar.as_json()["format"] == "huggingface"


@pytest.mark.parametrize("method, extra", [("umtam", []), ("fisher", []), ("ota", [])])
def test_methods_that_need_statistics_refuse_a_plain_input(method, extra, plain_sst2, trained, tiny_model_dir,
                                                          tmp_path):
    code, _, stderr = run_cli("merge", str(plain_sst2), str(trained.path), "--method", method, *extra,
                              "--base", str(tiny_model_dir), "--task-names", "sst2", "-o", str(tmp_path / "m"))
    assert code == 1
    assert str(plain_sst2) in stderr and "plain Hugging Face directory" in stderr and "ties" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "m").exists()


def test_umtam_with_magnitude_trim_and_uniform_weights_takes_a_plain_input(plain_sst2, trained, tiny_model_dir,
                                                                           tmp_path):
    code, stdout, stderr = run_cli("merge", str(plain_sst2), str(trained.path), "--trim", "magnitude",
                                   "--weights", "uniform", "--base", str(tiny_model_dir), "--task-names", "sst2",
                                   "--dry-run", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["tasks"] == ["sst2", "mrpc"]


def test_plain_input_with_another_base_is_refused(tmp_path, tiny_model_dir, trained):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(99)  # same architecture, unrelated weights
    stranger = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    stranger.save_pretrained(tmp_path / "stranger")
    code, _, stderr = run_cli("merge", str(tmp_path / "stranger"), str(trained.path), "--method", "ties",
                              "--base", str(tiny_model_dir), "--task-names", "sst2", "-o", str(tmp_path / "m"))
    assert code == 1 and "does not look fine-tuned from the base model" in stderr
    assert str(tmp_path / "stranger") in stderr and not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--method", "ties", "--task-names", "sst2"], 2, "pass --base"),
        (["--method", "ties", "--base", "BASE"], 2, "--task-names"),
        (["--method", "ties", "--base", "BASE", "--task-names", "sst2,rte"], 2,
         "2 task name(s) given for 1 plain Hugging Face input(s)"),
        (["--method", "ties", "--base", "BASE", "--task-names", "mnli"], 2,
         "its head has 2 label(s) but task mnli has 3"),
        (["--method", "ties", "--base", "BASE", "--task-names", "sst3"], 2, "unknown task 'sst3'"),
    ],
)
def test_plain_input_usage_errors(args, code, message, plain_sst2, trained, tiny_model_dir, tmp_path):
    args = [str(tiny_model_dir) if arg == "BASE" else arg for arg in args]
    got, _, stderr = run_cli("merge", str(plain_sst2), str(trained.path), *args, "-o", str(tmp_path / "m"))
    assert got == code and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "m").exists()


def test_pickled_weights_are_refused_unread(tmp_path, plain_sst2, trained, tiny_model_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((plain_sst2 / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    code, _, stderr = run_cli("merge", str(pickled), str(trained.path), "--method", "ties", "--base",
                              str(tiny_model_dir), "--task-names", "sst2", "-o", str(tmp_path / "m"))
    assert code == 1 and "pytorch_model.bin" in stderr and "safetensors" in stderr
    assert str(pickled) in stderr



def test_trained_statistics_use_the_documented_names_and_shapes(trained):
    """README's statistics table: Adafactor's exp_avg_sq_row/_col for matrices, Adam's exp_avg_sq for vectors."""
    weights, stats = trained.load_tensors(), trained.load_stats()
    expected = {}
    for name, tensor in weights.items():
        if not tensor.is_floating_point():
            continue
        if tensor.dim() >= 2:
            expected[f"exp_avg_sq_row/{name}"] = (tensor.shape[0],)
            expected[f"exp_avg_sq_col/{name}"] = (tensor.numel() // tensor.shape[0],)
        else:
            expected[f"exp_avg_sq/{name}"] = tuple(tensor.shape)
    assert {key: tuple(value.shape) for key, value in stats.items()} == expected
    assert all(bool((value >= 0).all()) and value.dtype == torch.float32 for value in stats.values())
    assert trained.sidecar.as_json()["stats"] == {"beta2": 0.999, "bias_corrected": True,
                                        "tracked_steps": trained.sidecar.as_json()["steps"]}
