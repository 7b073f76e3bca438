"""Fuzzing the checkpoint loaders: mutated sidecars and safetensors files fail only as UmtamError.

The strategies live in fuzz_strategies.py (bench/fuzz.py runs the same ones for
10,000 cases). Here hypothesis drives them through ``st.randoms()``, so a
failure shrinks to a small sequence of choices. Below the property tests, the
header validator is pinned case by case, and one test shows the property would
catch a loader that trusted its input.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_strategies import (READERS, exercise, inspect_sidecar, run_case, sidecar_variants, single_point_mutations,
                             write_seed_checkpoint)
from umtam import safetensors_io
from umtam.checkpoint import load_checkpoint
from umtam.sidecar import MAX_SIDECAR_BYTES
from umtam.safetensors_io import load_tensors, tensor_shapes
from umtam.errors import CheckpointError, UmtamError

# deadline=None: the shared 2-core machine makes per-example timing noise; fuzz_once bounds it loosely instead.
# bounded_memory is function-scoped on purpose: it measures all the examples of one test together.
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW_CASE_SECONDS = 10  # a case takes ~15 ms; one this slow is a hang in the making
RSS_GROWTH_LIMIT = 256 * 2**20  # the cases are a few KiB: a loader allocating what a header claims shows here


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory) -> Path:
    return write_seed_checkpoint(tmp_path_factory.mktemp("fuzz") / "seed")


@pytest.fixture
def bounded_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    yield
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before < RSS_GROWTH_LIMIT


def fuzz_once(rng, seed_dir: Path, target: str) -> str:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        mutated, outcome = run_case(rng, seed_dir, Path(scratch) / "case", target)
    assert mutated == target
    assert outcome in ("ok", "CheckpointError")
    assert time.perf_counter() - started < SLOW_CASE_SECONDS
    return outcome


def test_the_seed_checkpoint_reads_cleanly_everywhere(seed_dir):
    assert exercise(seed_dir) == {name: "ok" for name in READERS}


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutated_sidecars_fail_only_as_umtam_errors(seed_dir, bounded_memory, rng):
    fuzz_once(rng, seed_dir, "sidecar")


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutated_weights_fail_only_as_umtam_errors(seed_dir, bounded_memory, rng):
    fuzz_once(rng, seed_dir, "model")


@FUZZ
@given(rng=st.randoms(use_true_random=False))
def test_mutated_statistics_fail_only_as_umtam_errors(seed_dir, bounded_memory, rng):
    fuzz_once(rng, seed_dir, "stats")


@pytest.mark.parametrize("kind", ["train", "prune", "merge"])
def test_every_single_field_of_a_sidecar_mutated_fails_only_as_umtam_error(seed_dir, kind):
    # Exhaustive where the random edits are thin: each value deleted or given each other JSON type.
    document = sidecar_variants(seed_dir)[kind]
    inspect_sidecar(seed_dir, document)
    refused = []
    for where, mutated in single_point_mutations(document):
        try:
            inspect_sidecar(seed_dir, mutated)
        except UmtamError as error:
            refused.append(str(error))
        except Exception as exc:  # noqa: BLE001 - report which field, not just the traceback
            pytest.fail(f"{kind} sidecar, {where}: {type(exc).__name__}: {exc}")
    assert any("missing field(s) kind" in message for message in refused)
    assert any("tasks.mrpc.label_names must be a list, got" in message for message in refused)


def test_the_property_catches_a_reader_that_lets_the_bindings_errors_out(seed_dir, tmp_path, monkeypatch):
    # If open_safetensors stopped turning the binding's errors into CheckpointErrors,
    # the malformed files would escape as something else: the fuzz cases must see that.
    monkeypatch.setattr(safetensors_io, "unreadable", lambda path, reason: RuntimeError(reason))
    escaped = []
    for index in range(40):
        try:
            run_case(random.Random(f"trusting:{index}"), seed_dir, tmp_path / f"case-{index}", "model")
        except Exception as exc:  # noqa: BLE001 - collecting exactly what the property forbids
            escaped.append(type(exc).__name__)
    assert "RuntimeError" in escaped


# ----------------------------------------------------------------------------- malformed files, case by case
# The binding (safetensors 0.4.3 to 0.8.0) refuses most of these itself; umtam names the
# dtype it refuses and the int64 overflow it misses (umtam.safetensors_io). Either way the
# reader raises one CheckpointError naming the file.


def safetensors_bytes(header: dict, data: bytes, *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(name="w", shape=(3,), offsets=(0, 12)) -> dict:
    return {name: {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}}


def test_a_valid_file_gives_its_shapes_and_tensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.zeros(0, 5)}
    save_file(tensors, str(path))
    assert tensor_shapes(path) == {"a": (2, 3), "b": (4,), "c": (0, 5)}
    loaded = load_tensors(path)
    assert all(torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype for key, value in tensors.items())


BINDING = "Error while deserializing header: "


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02\x03", BINDING + "header too small"),
    (struct.pack("<Q", 500) + b"{}", BINDING + "invalid header length"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", BINDING + "header too large"),
    (safetensors_bytes({}, b"", raw=b"[1, 2]"), BINDING + "invalid JSON in header"),
    (safetensors_bytes({}, b"", raw=b"{\xff}"), BINDING + "invalid UTF-8 in header"),
    (safetensors_bytes({}, b"", raw=b"{" * 50_000), BINDING + "invalid JSON in header"),
    (safetensors_bytes({}, b"\0" * 4, raw=b'{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
     BINDING + "invalid JSON in header"),
    (safetensors_bytes({"__metadata__": {"format": 1}, **f32()}, b"\0" * 12), "expected a string"),
    (safetensors_bytes({"w": {"dtype": "F32", "shape": [3]}}, b"\0" * 12), "missing field `data_offsets`"),
    (safetensors_bytes({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
     "tensor 'w' has unknown dtype 'C64'"),
    (safetensors_bytes({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
     "tensor 'w' has unknown dtype 'F4'"),
    (safetensors_bytes(f32(shape=[-3]), b"\0" * 12), "invalid value: integer `-3`"),
    (safetensors_bytes(f32(shape=[3.0]), b"\0" * 12), "invalid type: floating point `3.0`"),
    (safetensors_bytes(f32(shape=[True, 3]), b"\0" * 12), "invalid type: boolean `true`"),
    (safetensors_bytes(f32(offsets=[12, 0]), b"\0" * 12), BINDING + "invalid offset for tensor `w`"),
    (safetensors_bytes(f32(offsets=[0, 12, 12]), b"\0" * 12), "invalid length 3, expected 2 elements"),
    (safetensors_bytes(f32(shape=[4]), b"\0" * 12), BINDING + "invalid shape, data type, or offset"),
    (safetensors_bytes(f32(shape=[2**40], offsets=[0, 2**42]), b"\0" * 12), BINDING + "incomplete metadata"),
    # the binding checks the product of the dimensions only: 0 x 2**63 is umtam's to refuse
    (safetensors_bytes(f32(shape=[0, 2**63], offsets=[0, 0]), b""),
     "tensor 'w' has shape [0, 9223372036854775808] beyond int64 sizes"),
    (safetensors_bytes(f32(shape=[2**40, 2**40, 0], offsets=[0, 0]), b""), BINDING + "overflow computing buffer"),
    (safetensors_bytes({**f32("a"), **f32("b", offsets=[4, 16])}, b"\0" * 16), BINDING + "invalid offset for tensor `b`"),
    (safetensors_bytes(f32(shape=[2], offsets=[4, 12]), b"\0" * 12), BINDING + "invalid offset for tensor `w`"),
    (safetensors_bytes(f32(), b"\0" * 13), BINDING + "incomplete metadata, file not fully covered"),
])
def test_malformed_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    for read in (tensor_shapes, load_tensors):
        with pytest.raises(CheckpointError) as refused:
            read(path)
        text = str(refused.value)
        assert text.startswith(f"{path}: not a readable safetensors file (") and message in text
        assert "\n" not in text


# ----------------------------------------------------------------------------- sidecars, case by case


def test_sidecar_nested_past_the_recursion_limit_is_invalid_json(seed_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    (case / "umtam.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"umtam.json: not valid JSON \(maximum recursion depth"):
        load_checkpoint(case)


def test_sidecar_that_is_not_utf8_names_the_file(seed_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    (case / "umtam.json").write_bytes(b'{"kind": "\xff"}')
    with pytest.raises(CheckpointError, match=r"umtam.json: not valid JSON \(not UTF-8"):
        load_checkpoint(case)


def test_an_oversized_sidecar_is_refused_before_it_is_read(seed_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    with open(case / "umtam.json", "r+b") as handle:
        handle.truncate(MAX_SIDECAR_BYTES + 1)  # sparse
    with pytest.raises(CheckpointError, match="too large for a sidecar"):
        load_checkpoint(case)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["files"].update({"a\nb": s["files"]["config.json"]}), "points outside the checkpoint directory"),
    (lambda s: s["tasks"]["mrpc"].update(is_regression="no"), "tasks.mrpc.is_regression must be true or false"),
    (lambda s: s["tasks"]["mrpc"].update(label_names=[1, 2]), "tasks.mrpc.label_names[0] must be a string, got 1"),
    (lambda s: s["tasks"]["mrpc"].update(label_names=[]), "label_names has 0 label(s) but task mrpc has 2"),
    (lambda s: s["tasks"]["mrpc"].update(metrics=[0.5]), "tasks.mrpc.metrics must be an object of numbers"),
    (lambda s: s["tasks"].update({"a/b": s["tasks"]["mrpc"]}), "task name 'a/b' must be non-empty and printable, without '/'"),
    (lambda s: s["files"]["config.json"].update(sha256="XYZ"), "files['config.json'].sha256 must be 64 lowercase hex"),
    (lambda s: s["files"]["config.json"].update(bytes=-1), "files['config.json'].bytes must be non-negative, got -1"),
    (lambda s: s.update(optimizer=["umtam"]), "optimizer must be an object, got ['umtam']"),
    (lambda s: s.update(steps="6"), "steps must be an integer, got '6'"),
    (lambda s: s.update(lineage={"inputs": [{"sha256": 5}]}), "lineage.inputs[0].sha256 must be a string"),
    (lambda s: s["base_model"].update(init_seed="x"), "base_model.init_seed must be an integer"),
])
def test_optional_fields_with_the_wrong_type_are_named(seed_dir, tmp_path, edit, message):
    case = tmp_path / "case"
    shutil.copytree(seed_dir, case)
    sidecar = json.loads((case / "umtam.json").read_text())
    edit(sidecar)
    (case / "umtam.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(case)
    assert message in str(refused.value) and "\n" not in str(refused.value)
