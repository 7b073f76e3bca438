"""A couple of real steps: the real MiniLM on real MRPC rows (skipped when ../shared is absent)."""

from __future__ import annotations

import json

import pytest

from umtam.train import TrainConfig, train

# loading and training the real 22.7M-parameter model takes 10-40 s here: CI runs it (--slow)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shared_model_dir, shared_glue_dir):
    out = tmp_path_factory.mktemp("real") / "mrpc"
    config = TrainConfig(task="mrpc", output=str(out), model=str(shared_model_dir), optimizer="umtam", rank=4,
                         max_steps=2, batch_size=8, max_length=32, max_train_samples=16, max_eval_samples=16,
                         data_dir=str(shared_glue_dir), seed=3)
    return train(config), shared_model_dir


def test_real_minilm_trains_two_steps_and_records_everything(real_run):
    checkpoint, model_dir = real_run
    sidecar = checkpoint.sidecar.as_json()
    assert sidecar["steps"] == 2
    assert sidecar["base_model"]["location"] == str(model_dir.resolve())
    assert set(sidecar["tasks"]["mrpc"]["metrics"]["validation"]) == {"f1", "accuracy"}
    stats = checkpoint.load_stats()
    # every 2-D weight has row and column statistics: 3 embeddings + 6 layers x 6 + pooler + classifier
    assert stats["exp_avg_sq_row/bert.embeddings.word_embeddings.weight"].shape == (30522,)
    assert stats["exp_avg_sq_col/bert.embeddings.word_embeddings.weight"].shape == (384,)
    assert stats["exp_avg_sq_row/bert.encoder.layer.5.intermediate.dense.weight"].shape == (1536,)
    assert sum(key.startswith("exp_avg_sq_row/") for key in stats) == 3 + 6 * 6 + 1 + 1
    # the optimizer state of UMTAM r=4 is a small fraction of AdamW's 2 x 22.7M floats
    assert sidecar["optimizer"]["optimizer_bytes"] < 0.02 * 2 * 22_713_602 * 4


def test_the_recorded_base_fingerprint_rebuilds(real_run):
    from umtam.base_model import load_base_encoder

    checkpoint, _ = real_run
    base = load_base_encoder(checkpoint.sidecar.as_json()["base_model"])
    assert base["bert.embeddings.word_embeddings.weight"].shape == (30522, 384)


def test_transformers_loads_the_real_checkpoint(real_run):
    from transformers import AutoModelForSequenceClassification

    checkpoint, _ = real_run
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint.path)
    assert model.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    assert json.loads((checkpoint.path / "config.json").read_text())["architectures"] == [
        "BertForSequenceClassification"]
