"""tools/reinit_pooler.py: a base copy whose pooler is drawn afresh, everything else byte for byte the same."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
# wide enough (64 x 64 pooler) that the drawn weight's spread is within a few percent of the asked one
CONFIG = dict(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
              max_position_embeddings=32, initializer_range=0.05)


@pytest.fixture
def tool(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    yield importlib.import_module("reinit_pooler")
    sys.modules.pop("reinit_pooler", None)


@pytest.fixture
def base(tmp_path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG))
    with torch.no_grad():
        model.pooler.dense.weight.mul_(0.1)  # an untrained-looking pooler, as in all-MiniLM-L6-v2
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return tmp_path / "base"


def test_only_the_pooler_changes_and_transformers_loads_the_copy(tool, base, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tool.write_copy(base, tmp_path / "copy", seed=0, force=False)
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "copy" / "model.safetensors")
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"pooler.dense.weight"}  # the bias was already zero, and stays so
    assert torch.count_nonzero(after["pooler.dense.bias"]) == 0
    assert after["pooler.dense.weight"].std().item() == pytest.approx(0.05, rel=0.05)
    assert (tmp_path / "copy" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "copy", num_labels=2)
    assert torch.equal(model.bert.pooler.dense.weight.detach(), after["pooler.dense.weight"])


def test_the_draw_is_fixed_by_the_seed(tool, base, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        tool.write_copy(base, tmp_path / name, seed=seed, force=False)
    weights = {name: load_file(tmp_path / name / "model.safetensors")["pooler.dense.weight"] for name in "abc"}
    assert torch.equal(weights["a"], weights["b"])
    assert not torch.equal(weights["a"], weights["c"])


def test_a_classifier_checkpoint_has_its_prefixed_pooler_redrawn(tool):
    tensors = {"bert.pooler.dense.weight": torch.ones(4, 4), "bert.pooler.dense.bias": torch.ones(4),
               "classifier.weight": torch.ones(2, 4)}
    fresh = tool.reinitialised(tensors, 0.02, seed=0)
    assert not torch.equal(fresh["bert.pooler.dense.weight"], tensors["bert.pooler.dense.weight"])
    assert torch.count_nonzero(fresh["bert.pooler.dense.bias"]) == 0
    assert fresh["classifier.weight"] is tensors["classifier.weight"]


def test_bad_input_is_refused_before_anything_is_written(tool, base, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "taken").mkdir()
    no_pooler = tmp_path / "no-pooler"
    no_pooler.mkdir()
    (no_pooler / "config.json").write_text("{}")
    save_file({"lm_head.weight": torch.ones(2, 2)}, no_pooler / "model.safetensors")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{}")
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 100)
    for source, out, words in ((base, tmp_path / "taken", "already exists"),
                               (tmp_path / "missing", tmp_path / "out", "no model.safetensors"),
                               (no_pooler, tmp_path / "out", "only BERT-family encoders"),
                               (corrupt, tmp_path / "out", "not a readable safetensors file")):
        with pytest.raises(tool.UmtamError, match=words):
            tool.write_copy(source, out, seed=0, force=False)
    assert not (tmp_path / "out").exists() and list((tmp_path / "taken").iterdir()) == []


def test_the_command_line_reports_one_line_and_exit_2(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "tools" / "reinit_pooler.py"), str(tmp_path / "missing"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"reinit_pooler: {tmp_path / 'missing'}: no model.safetensors "
                                                  "(a single-file safetensors model is expected)"]
