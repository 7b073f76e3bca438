"""The streaming merge engine on tiny checkpoints built in code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_checkpoints import build_family, fake_stats, tiny_model
from umtam.checkpoint import load_checkpoint, write_checkpoint
from umtam.errors import CheckpointError, ConfigError, MergeError
from umtam.merge import TensorGroup, get_method, merge_checkpoints, merge_tensors, plan
from umtam.base_model import load_base_encoder
from umtam.heads import encoder_tensors
from umtam.saliency import tensor_threshold

TASKS = ("mrpc", "sst2", "mnli")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("merge-family"), {"mrpc": 2, "sst2": 2, "mnli": 3})


@pytest.fixture(scope="module")
def experts(family):
    return [family.experts[task] for task in TASKS]


def _write_variant(path, family, *, task="qnli", base_record=None, edit=None, with_stats=True):
    """An expert whose weights or sidecar are changed by ``edit(state)``."""
    model = tiny_model(seed=9)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if edit is not None:
        edit(state)
    sidecar = {"kind": "train", "tasks": {task: {"label_names": ["a", "b"], "metrics": {}}},
               "base_model": base_record or dict(family.base_record)}
    return write_checkpoint(path, tensors=state, sidecar=sidecar,
                            stats=fake_stats(state, seed=3) if with_stats else None)


def in_memory_merge(checkpoints, method, options, base):
    """The slow, obviously-correct reference: every input loaded whole, the same pure function."""
    spec = get_method(method)
    options = spec.resolve_options(options)
    states = [load_file(str(c.model_file)) for c in checkpoints]
    stats = [c.load_stats() for c in checkpoints]
    labels = tuple(str(c.path) for c in checkpoints)
    task_ids = tuple("+".join(sorted(c.tasks)) for c in checkpoints)
    keys = sorted(encoder_tensors(states[0]))
    matrices = [k for k in keys if states[0][k].dim() >= 2]

    def group(key, thresholds=None):
        return TensorGroup(key, tuple(s[key] for s in states), base=base[key], stats=tuple(stats),
                           labels=labels, task_ids=task_ids, thresholds=thresholds)

    thresholds = None
    if options.get("scope") == "global":
        per_key = [spec.trim_scores(group(k), options) for k in matrices]
        thresholds = tuple(
            tensor_threshold(torch.cat([scores[t].reshape(-1) for scores in per_key]), options["keep"])
            for t in range(len(checkpoints))
        )
    merged = {}
    for key in keys:
        if key in matrices:
            merged[key] = spec.merge(group(key, thresholds), options)
        elif options["norms"] == "base":
            merged[key] = base[key]
        else:
            merged[key] = torch.stack([s[key] for s in states]).mean(dim=0)
    return merged


CASES = [
    ("umtam", {}),
    ("umtam", {"scope": "global", "norms": "base"}),
    ("ties", {}),  # global trim by default: the prepare pass
    ("ota", {"keep": 0.3}),
    ("dare-ties", {"seed": 3}),
    ("fisher", {}),
]


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streaming_equals_in_memory_merge_bit_for_bit(family, experts, method, options):
    streamed, _ = merge_tensors(experts, method=method, options=options)
    reference = in_memory_merge(experts, method, options, load_base_encoder(family.base_record))
    for key, value in reference.items():
        assert torch.equal(streamed[key], value), key
    assert not set(streamed) - set(reference) - {k for k in streamed if k.startswith("heads/")}


def test_output_checkpoint_heads_sidecar_and_files(family, experts, tmp_path):
    calls = []
    merged, report = merge_checkpoints(experts, tmp_path / "merged", method="ties",
                                       progress=lambda done, total, name: calls.append((done, total)))
    tensors = merged.load_tensors()
    for checkpoint in experts:
        (task,) = checkpoint.tasks
        own = checkpoint.load_tensors()
        for key in ("classifier.weight", "classifier.bias"):
            assert torch.equal(tensors[f"heads/{task}/{key}"], own[key])  # never averaged
    assert tensors["heads/mnli/classifier.weight"].shape == (3, 8)
    assert not any(key.startswith("classifier.") for key in tensors)

    sidecar = load_checkpoint(merged.path).sidecar.as_json()
    assert sidecar["kind"] == "merge"
    assert set(sidecar["tasks"]) == set(TASKS)
    assert sidecar["tasks"]["sst2"]["expert_metrics"] == experts[1].tasks["sst2"].as_json()["metrics"]
    assert sidecar["tasks"]["sst2"]["label_names"] == ["l0", "l1"]
    lineage = sidecar["lineage"]
    assert [item["sha256"] for item in lineage["inputs"]] == [
        c.sidecar.as_json()["files"]["model.safetensors"]["sha256"] for c in experts]
    assert [item["tasks"] for item in lineage["inputs"]] == [[t] for t in TASKS]
    assert lineage["method"] == "ties" and lineage["options"]["keep"] == 0.2
    assert set(lineage["thresholds"]) == set(TASKS)
    assert sidecar["base_model"] == experts[0].sidecar.as_json()["base_model"]
    for name in ("config.json", "vocab.txt"):
        assert (merged.path / name).read_bytes() == (experts[0].path / name).read_bytes()
    assert not (merged.path / "stats.safetensors").exists()

    assert calls[-1][0] == calls[-1][1] == report.plan.tensor_count + 2 * report.plan.method_tensors
    assert [done for done, _ in calls] == list(range(1, len(calls) + 1))


def test_one_dimensional_parameters_follow_norms(family, experts):
    averaged, _ = merge_tensors(experts, method="average", options={"norms": "average"})
    kept_base, _ = merge_tensors(experts, method="average")  # norms="base" is the default
    key = "bert.encoder.layer.0.output.LayerNorm.bias"
    states = [c.load_tensors() for c in experts]
    assert torch.equal(averaged[key], torch.stack([s[key] for s in states]).mean(dim=0))
    assert torch.equal(kept_base[key], family.base_encoder[key])


def test_merged_input_carries_its_heads_and_expert_metrics(family, experts, tmp_path):
    first, _ = merge_checkpoints(experts[:2], tmp_path / "pair", method="average")
    again, _ = merge_checkpoints([first, experts[2]], tmp_path / "triple", method="average")
    tensors = again.load_tensors()
    for task, checkpoint in zip(TASKS, experts):
        own_head = checkpoint.load_tensors()["classifier.weight"]
        assert torch.equal(tensors[f"heads/{task}/classifier.weight"], own_head)
    assert again.tasks["mrpc"].as_json()["expert_metrics"] == experts[0].tasks["mrpc"].as_json()["metrics"]
    assert again.sidecar.as_json()["lineage"]["inputs"][0]["tasks"] == ["mrpc", "sst2"]


def test_different_bases_are_refused_naming_paths_and_fingerprints(family, experts, tmp_path):
    other_base = {**family.base_record, "fingerprint": "f" * 64}
    stranger = _write_variant(tmp_path / "stranger", family, base_record=other_base)
    with pytest.raises(MergeError) as caught:
        plan([experts[0], stranger], method="average")
    message = str(caught.value)
    assert str(experts[0].path) in message and str(stranger.path) in message
    assert family.base_record["fingerprint"][:12] in message and "ffffffffffff" in message


def test_different_keys_are_refused_naming_the_tensor(family, experts, tmp_path):
    lacking = _write_variant(tmp_path / "lacking", family, edit=lambda s: s.pop("bert.pooler.dense.bias"))
    with pytest.raises(MergeError, match="bert.pooler.dense.bias") as caught:
        merge_tensors([experts[0], lacking], method="average")
    assert str(lacking.path) in str(caught.value)


def test_different_shapes_are_refused_naming_the_tensor(family, experts, tmp_path):
    def reshape(state):
        state["bert.pooler.dense.weight"] = state["bert.pooler.dense.weight"].reshape(4, 16)

    odd = _write_variant(tmp_path / "odd", family, edit=reshape)
    with pytest.raises(MergeError, match=r"bert\.pooler\.dense\.weight.*\[8, 8\].*\[4, 16\]"):
        merge_tensors([experts[0], odd], method="average")


def test_fewer_than_two_inputs_is_a_usage_error(experts):
    with pytest.raises(ConfigError, match="at least 2"):
        merge_tensors([experts[0]], method="average")
    with pytest.raises(ConfigError, match="at least 2"):
        plan(experts[0].path, method="average")


def test_the_same_task_twice_is_refused(experts):
    with pytest.raises(MergeError, match="'mrpc' is in both"):
        plan([experts[0], experts[0]], method="average")


def test_missing_statistics_are_reported_before_any_work(family, experts, tmp_path):
    bare = _write_variant(tmp_path / "bare", family, with_stats=False)
    with pytest.raises(CheckpointError) as caught:
        plan([experts[0], bare], method="umtam")
    message = str(caught.value)
    assert str(bare.path) in message and "exp_avg_sq_row/" in message and "umtam train" in message
    # magnitude-only methods need no statistics
    merged, _ = merge_tensors([experts[0], bare], method="ties", options={"scope": "tensor"})
    assert "heads/qnli/classifier.weight" in merged
    merge_tensors([experts[0], bare], method="umtam", options={"trim": "magnitude", "weights": "uniform"})


def test_plan_describes_the_merge_without_writing(experts, tmp_path):
    described = plan(experts, method="ties")
    assert described.method == "ties" and described.passes == 3 and described.needs_base
    assert described.tensor_count == 23 and described.method_tensors == 10 and described.head_tensors == 6
    assert described.tasks == TASKS
    # three inputs of the largest tensor (40 x 8 word embeddings) are part of the estimate
    assert described.estimated_peak_bytes > 3 * 40 * 8 * 4
    # a plain average needs no base unless the 1-D parameters are to be reset to it
    assert plan(experts, method="average", options={"norms": "average"}).needs_base is False
    assert plan(experts, method="average").needs_base is True
    assert json.dumps(described.as_dict())
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(experts, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        merge_checkpoints(experts[:2], tmp_path / "taken", method="average")
    merge_checkpoints(experts[:2], tmp_path / "taken", method="average", force=True)
    assert load_checkpoint(tmp_path / "taken").kind == "merge"


# ----------------------------------------------------------------------------- row blocks

BLOCK_CASES = CASES + [
    ("average", {}),
    ("task-arithmetic", {"lambda": 0.5}),
    ("ties", {"scope": "tensor", "agg": "sum"}),
    ("umtam", {"trim": "magnitude", "weights": "uniform", "elect": False}),
    ("umtam", {"trim": "second-moment", "keep": 0.5}),
    ("ota", {"normalise": "mean", "denominator": "kept", "scope": "global"}),
    ("ota", {"graft": "curvature"}),
    ("dare", {"drop": 0.3, "seed": 4}),
    ("dare-ties", {"agg": "sum"}),
    ("fisher", {"norms": "base"}),
]


@pytest.mark.parametrize("method,options", BLOCK_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(BLOCK_CASES)])
def test_merging_in_tiny_row_blocks_equals_whole_tensors_bit_for_bit(experts, method, options):
    # 8 entries per input: one row of every 8-wide weight at a time, so every 2-D
    # tensor is split and per-tensor thresholds, curvature means and DARE's
    # random streams must all be the whole tensor's; 24 leaves a ragged last block.
    whole, whole_report = merge_tensors(experts, method=method, options=options)
    for block_entries in (8, 24):
        blocked, report = merge_tensors(experts, method=method, options=options, block_entries=block_entries)
        assert blocked.keys() == whole.keys()
        for key, value in whole.items():
            assert blocked[key].dtype == value.dtype and torch.equal(blocked[key], value), (block_entries, key)
        assert report.thresholds == whole_report.thresholds


def test_block_entries_must_be_a_positive_integer(experts):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="block_entries"):
            merge_tensors(experts, method="average", block_entries=bad)


def test_base_is_read_from_its_safetensors_without_building_a_model(family, experts, monkeypatch):
    import umtam.models as models

    keys = sorted(encoder_tensors(experts[0].load_tensors()))
    rebuilt = load_base_encoder(family.base_record)

    def no_model(*args, **kwargs):
        raise AssertionError("the base should be read from its file, not rebuilt")

    monkeypatch.setattr(models, "load_classifier", no_model)
    direct = load_base_encoder(family.base_record, keys=keys)
    assert direct.keys() == rebuilt.keys()
    assert all(torch.equal(direct[key], rebuilt[key]) for key in keys)
    merged, _ = merge_tensors(experts, method="ties")  # the whole merge takes the direct path too
    assert merged


def test_base_saved_as_a_bare_encoder_is_read_through_the_model_prefix(family, tmp_path, monkeypatch):
    import umtam.models as models

    classifier = tiny_model(seed=0)  # the family's base, saved without the "bert." prefix
    classifier.bert.save_pretrained(tmp_path / "bare")
    record = {**family.base_record, "reference": str(tmp_path / "bare"), "location": str(tmp_path / "bare")}
    keys = sorted(family.base_encoder)
    monkeypatch.setattr(models, "load_classifier", lambda *a, **k: pytest.fail("rebuilt"))
    direct = load_base_encoder(record, keys=keys)
    assert all(torch.equal(direct[key], family.base_encoder[key]) for key in keys)


def test_base_file_that_does_not_hash_to_the_fingerprint_falls_back_and_is_refused(family, tmp_path):
    from safetensors.torch import save_file

    changed = {key: value.clone() for key, value in family.base_encoder.items()}
    changed["bert.pooler.dense.bias"] += 1.0
    (tmp_path / "other").mkdir()
    save_file(changed, str(tmp_path / "other" / "model.safetensors"))
    (tmp_path / "other" / "config.json").write_text((family.base_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="does not match the recorded fingerprint"):
        load_base_encoder(family.base_record, override=str(tmp_path / "other"), keys=sorted(changed))


def test_plan_estimate_covers_the_streamed_tensors_and_one_block(experts):
    # the output streams to disk: the tensor being made and two queued for the writer are held, not the model
    described = plan(experts, method="umtam")
    largest = max(t.numel() * t.element_size() for t in merge_tensors(experts, method="umtam")[0].values())
    assert 3 * largest < described.estimated_peak_bytes
    small = plan(experts, method="umtam", block_entries=8)
    assert small.estimated_peak_bytes < described.estimated_peak_bytes


@pytest.mark.parametrize("method,options", BLOCK_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(BLOCK_CASES)])
def test_tensors_merged_by_several_threads_equal_one_thread_bit_for_bit(experts, method, options, monkeypatch):
    from umtam.merge import engine

    monkeypatch.setattr(engine, "MERGE_WORKERS", 1)
    alone, _ = merge_tensors(experts, method=method, options=options, block_entries=24)
    monkeypatch.setattr(engine, "MERGE_WORKERS", 3)
    threaded, _ = merge_tensors(experts, method=method, options=options, block_entries=24)
    assert list(threaded) == list(alone)  # handed to the output in the same order
    for key, value in alone.items():
        assert torch.equal(threaded[key], value), key


def test_with_several_threads_the_error_is_the_first_tensor_s(family, tmp_path, monkeypatch):
    from umtam.merge import engine

    monkeypatch.setattr(engine, "MERGE_WORKERS", 4)
    first, later = "bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight"

    def poison(state):
        state[first][0, 0] = float("nan")
        state[later][0, 0] = float("nan")

    broken = _write_variant(tmp_path / "broken", family, edit=poison)
    with pytest.raises(CheckpointError, match=f"tensor '{first}' holds NaN"):
        merge_tensors([family.experts["mrpc"], broken], method="task-arithmetic")
