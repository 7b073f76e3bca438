"""Bad input for the decoder-LM paths: one line on stderr, exit 1 (data) or 2 (usage), nothing written."""

from __future__ import annotations

import pytest

from cli_runner import run_cli
from lm_fixtures import write_text_corpus, write_tiny_decoder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"chat": write_tiny_decoder(root / "chat", "llama"),
            "plain": write_tiny_decoder(root / "plain", "llama", chat=False)}


def refused(args, code, *fragments):
    got, _, stderr = run_cli(*args)
    lines = stderr.strip().splitlines()
    assert (got, len(lines)) == (code, 1), stderr
    assert lines[0].startswith("umtam: error: ") and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_args(model, data, out, *extra, task="lm"):
    return ["train", "--task", task, "--model", str(model), "--data", str(data), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "16", "-o", str(out), *extra]


def test_a_text_file_with_no_documents(tmp_path, models):
    (tmp_path / "empty.txt").write_text("  \n\n")
    refused(train_args(models["chat"], tmp_path / "empty.txt", tmp_path / "out", "--holdout-fraction", "0.5"),
            1, "empty.txt: no documents")
    assert not (tmp_path / "out").exists()


def test_a_jsonl_row_without_text(tmp_path, models):
    (tmp_path / "rows.jsonl").write_text('{"text": "the cat ."}\n{"body": "the dog ."}\n')
    refused(train_args(models["chat"], tmp_path / "rows.jsonl", tmp_path / "out", "--holdout-fraction", "0.5"),
            1, "rows.jsonl:2", "no 'text' field")


def test_a_chat_row_without_a_response(tmp_path, models):
    (tmp_path / "chats.jsonl").write_text('{"prompt": "hello", "response": "fine ."}\n{"prompt": "hello"}\n')
    refused(train_args(models["chat"], tmp_path / "chats.jsonl", tmp_path / "out", "--holdout-fraction", "0.5",
                       task="sft"), 1, "chats.jsonl:2", "no 'response'")
    (tmp_path / "turns.jsonl").write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')
    refused(train_args(models["chat"], tmp_path / "turns.jsonl", tmp_path / "out", "--holdout-fraction", "0.5",
                       task="sft"), 1, "turns.jsonl:1", "has no response")


def test_sft_with_a_model_that_has_no_chat_template(tmp_path, models):
    (tmp_path / "chats.jsonl").write_text('{"prompt": "hello", "response": "fine ."}\n' * 4)
    refused(train_args(models["plain"], tmp_path / "chats.jsonl", tmp_path / "out", "--holdout-fraction", "0.5",
                       task="sft"), 2, "no chat template")


def test_a_language_task_without_text_or_validation(tmp_path, models):
    corpus = write_text_corpus(tmp_path / "text")
    refused(["train", "--task", "lm", "--model", str(models["chat"]), "-o", str(tmp_path / "out")], 2, "needs --data")
    refused(train_args(models["chat"], corpus / "train.txt", tmp_path / "out"), 2, "needs validation text")
    refused(train_args(models["chat"], corpus / "train.txt", tmp_path / "out", "--data-dir", str(tmp_path)), 2,
            "--data-dir is for GLUE tasks")
    refused(["train", "--task", "rte", "--data", str(corpus / "train.txt"), "-o", str(tmp_path / "out")], 2,
            "--data and --eval-data are for the lm and sft tasks")
    refused(train_args(models["chat"], tmp_path / "missing.txt", tmp_path / "out", "--holdout-fraction", "0.1"),
            1, "missing.txt: no such file")


def test_a_single_document_cannot_be_split_for_validation(tmp_path, models):
    (tmp_path / "one.txt").write_text("the cat sees the dog .")
    refused(train_args(models["chat"], tmp_path / "one.txt", tmp_path / "out", "--holdout-fraction", "0.1"), 1,
            "cannot be split into training and validation")


def test_bf16_on_a_cpu_without_it_and_fp16_on_a_cpu(tmp_path, monkeypatch, models):
    corpus = write_text_corpus(tmp_path / "text")
    args = train_args(models["chat"], corpus / "train.txt", tmp_path / "out", "--eval-data",
                      str(corpus / "validation.jsonl"), "--device", "cpu", "--dtype")
    refused([*args, "fp16"], 2, "--dtype fp16 needs a CUDA device")
    monkeypatch.setattr("umtam.precision.cpu_supports_bf16", lambda: False)
    refused([*args, "bf16"], 2, "this CPU has no native bfloat16")
    refused([*args, "fp8"], 2, "dtype", "fp32, bf16, fp16")
    assert not (tmp_path / "out").exists()


def test_dense_embeddings_on_a_model_without_embeddings_it_knows_is_refused():
    from umtam.errors import ConfigError
    from umtam.optim import build_optimizer

    layer = torch_linear()
    with pytest.raises(ConfigError, match="no embedding matrix"):
        build_optimizer("umtam", list(layer.named_parameters()), lr=1e-3, dense_embeddings=True)


def torch_linear():
    import torch

    return torch.nn.Linear(4, 4)


def test_eval_data_needs_a_language_task(tmp_path, models):
    corpus = write_text_corpus(tmp_path / "text")
    code, _, stderr = run_cli(*train_args(models["chat"], corpus / "train.txt", tmp_path / "lm", "--eval-data",
                                          str(corpus / "validation.jsonl"), "--quiet"))
    assert code == 0, stderr
    refused(["eval", str(tmp_path / "lm"), "--task", "rte", "--data", str(corpus / "train.txt")], 2,
            "has no head for task(s) rte")
    refused(["eval", str(tmp_path / "lm"), "--task", "lm", "--data", str(tmp_path / "nothing.jsonl")], 1,
            "nothing.jsonl: no such file")
