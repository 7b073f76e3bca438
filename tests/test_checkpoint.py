"""The checkpoint directory: atomic writes, sidecar validation, hash checks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from umtam import checkpoint
from umtam.errors import CheckpointError, ConfigError

SIDECAR = {
    "kind": "train",
    "tasks": {"mrpc": {"label_names": ["not_equivalent", "equivalent"], "is_regression": False, "metrics": {}}},
    "base_model": {"reference": "tiny", "fingerprint": "ab" * 32},
}


def write(path, **overrides):
    tensors = overrides.pop("tensors", {"w": torch.arange(6.0).reshape(2, 3)})
    stats = overrides.pop("stats", {"exp_avg_sq_row/w": torch.ones(2)})
    return checkpoint.write_checkpoint(path, tensors=tensors, stats=stats, sidecar=dict(SIDECAR),
                                       extra_files={"config.json": b"{}"}, **overrides)


def test_round_trip_records_hashes_and_loads(tmp_path):
    written = write(tmp_path / "ckpt")
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert loaded.sidecar == written.sidecar
    assert loaded.sidecar.as_json()["schema_version"] == 1
    assert sorted(loaded.sidecar.as_json()["files"]) == ["config.json", "model.safetensors", "stats.safetensors"]
    assert loaded.sidecar.as_json()["files"]["config.json"]["sha256"] == (
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # sha256(b"{}")
    )
    assert torch.equal(loaded.load_tensors()["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(loaded.load_stats()["exp_avg_sq_row/w"], torch.ones(2))


def test_no_staging_directories_are_left_behind(tmp_path):
    write(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_existing_output_is_refused_without_force_and_replaced_with_it(tmp_path):
    write(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="already exists"):
        write(tmp_path / "ckpt")
    write(tmp_path / "ckpt", tensors={"w": torch.zeros(2, 3)}, force=True)
    assert torch.equal(checkpoint.load_checkpoint(tmp_path / "ckpt").load_tensors()["w"], torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError):  # the writer fails mid-payload: a string has no .detach
        checkpoint.write_checkpoint(tmp_path / "ckpt", tensors={"w": "not a tensor"}, sidecar=dict(SIDECAR))
    assert list(tmp_path.iterdir()) == []


def test_output_inside_an_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="inside input"):
        checkpoint.check_output_dir(tmp_path / "in" / "out", inputs=[tmp_path / "in"])


def test_directory_without_sidecar_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a umtam checkpoint"):
        checkpoint.load_checkpoint(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "nope")


def edit_sidecar(path, edit):
    sidecar_path = path / checkpoint.SIDECAR_FILE
    payload = json.loads(sidecar_path.read_text())
    edit(payload)
    sidecar_path.write_text(json.dumps(payload))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("kind"), "missing field"),
        (lambda s: s.update(schema_version=2), "newer than this umtam"),
        (lambda s: s.update(schema_version="1"), "must be an integer"),
        (lambda s: s.update(kind="bake"), "kind must be one of train, prune, merge, got 'bake'"),
        (lambda s: s.update(tasks={}), "non-empty"),
        (lambda s: s["files"].update({"../escape": {"sha256": "0"}}), "outside the checkpoint"),
        (lambda s: s["files"].update({"/etc/passwd": {"sha256": "0"}}), "outside the checkpoint"),
        (lambda s: s["files"]["model.safetensors"].update(sha256="0" * 64), "sha256 mismatch"),
    ],
)
def test_bad_sidecars_are_refused_with_the_field_named(tmp_path, edit, message):
    write(tmp_path / "ckpt")
    edit_sidecar(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_sidecar_that_is_not_json(tmp_path):
    write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / checkpoint.SIDECAR_FILE).write_text("{nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_truncated_weights_fail_the_hash_check(tmp_path):
    write(tmp_path / "ckpt")
    model = tmp_path / "ckpt" / checkpoint.MODEL_FILE
    os.truncate(model, model.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        checkpoint.load_checkpoint(tmp_path / "ckpt")


def test_garbage_weights_are_a_checkpoint_error_when_read(tmp_path):
    write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / checkpoint.MODEL_FILE).write_bytes(b"garbage")
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt", verify=False)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        loaded.load_tensors()
