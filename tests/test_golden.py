"""Behaviour pinned: seeded tiny runs of train, prune and merge reproduce recorded outputs exactly.

tests/golden_runs.py says what runs and how the record was made (before the
redesign of issue 12, so the redesign is shown to change nothing): the sha256
of every model.safetensors and stats.safetensors, the 20-step loss curve of
every optimizer, and one sidecar per kind with run-specific values masked.
"""

from __future__ import annotations

import json

import pytest

import golden_runs

RECORD = json.loads(golden_runs.RECORD.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import build_tiny_model_dir
    from glue_fixtures import write_glue_dir

    # laid out as the recording was, so the masked sidecars compare path for path
    root = tmp_path_factory.mktemp("golden")
    model = build_tiny_model_dir(root / "tiny-bert")
    glue = write_glue_dir(root / "data")
    return root, golden_runs.run_all(root / "runs", model, glue)


@pytest.mark.slow  # the runs fixture trains, prunes and merges every golden run: about 30 s
@pytest.mark.parametrize("stage, run", [(stage, run) for stage in golden_runs.OUTPUT_STAGES
                                        for run in RECORD[stage]])
def test_outputs_equal_the_recorded_bytes(runs, stage, run):
    _, results = runs
    recorded = golden_runs.recorded_outputs(RECORD, stage, run)
    assert results[stage][run] in recorded, (
        f"the bytes match no recorded kind of machine ({', '.join(['original', *RECORD.get('machines', {})])}); "
        "a new kind of CPU is recorded with python tests/golden_runs.py --record-machine LABEL, "
        "after test_twenty_step_loss_curve_of_each_optimizer has shown it only rounds differently")


@pytest.mark.slow  # the runs fixture trains, prunes and merges every golden run: about 30 s
@pytest.mark.parametrize("optimizer", sorted(RECORD["loss_curves"]))
def test_twenty_step_loss_curve_of_each_optimizer(runs, optimizer):
    # Exact on the recording machine; the tolerance is how far another CPU's rounding moves a
    # loss: an AMD EPYC (AVX-512) against the record, at most 4.1e-5 relative (GaLore, whose
    # top-r projector amplifies it), 1.6e-5 for UMTAM. A change of the math moves it by far more.
    _, results = runs
    assert results["loss_curves"][optimizer] == pytest.approx(RECORD["loss_curves"][optimizer], rel=2e-4)
    assert len(results["loss_curves"][optimizer]) == 20


@pytest.mark.slow  # the runs fixture trains, prunes and merges every golden run: about 30 s
@pytest.mark.parametrize("kind", sorted(golden_runs.SIDECARS))
def test_sidecar_of_each_kind_equals_the_golden_fixture(runs, kind):
    root, _ = runs
    written = golden_runs.normalized_sidecar(root / "runs" / golden_runs.SIDECARS[kind], root)
    golden = json.loads(golden_runs.golden_sidecar_path(kind).read_text())
    # file hashes are the outputs test's (per kind of machine); every number within cross-CPU rounding
    written, golden = without_hashes(written), without_hashes(golden)
    assert written.keys() == golden.keys()
    numbers = [path for path, value in golden.items() if isinstance(value, float)]
    assert {path: written[path] for path in numbers} == pytest.approx({path: golden[path] for path in numbers},
                                                                       rel=2e-4, abs=1e-12)
    assert {path: value for path, value in written.items() if path not in numbers} == {
        path: value for path, value in golden.items() if path not in numbers}


def without_hashes(document):
    """The sidecar with every sha256 written as <sha256>, and flattened to {path: leaf} so that
    pytest.approx compares its numbers (it does not descend into nested dicts)."""
    flat = {}

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                walk("<sha256>" if key == "sha256" else item, f"{path}/{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")
        else:
            flat[path] = value

    walk(document, "")
    return flat


@pytest.mark.parametrize("kind", sorted(golden_runs.SIDECARS))
def test_each_golden_sidecar_is_a_valid_typed_sidecar_that_round_trips(kind, tmp_path):
    from umtam.sidecar import validate_sidecar

    fixture = json.loads(golden_runs.golden_sidecar_path(kind).read_text())
    measured = {key: 1 for key in golden_runs.VOLATILE if fixture.get(key) == "<volatile>"}
    document = {**fixture, **measured}
    sidecar = validate_sidecar(document, tmp_path / "umtam.json")
    assert sidecar.kind == kind and sidecar.as_json() == document
    # what each reader uses, typed
    (task, record), = list(sidecar.tasks.items())[:1]
    assert record.label_names and sidecar.file_sha256() == document["files"]["model.safetensors"]["sha256"]
    assert (sidecar.lineage.method == "umtam") == (kind == "merge")
