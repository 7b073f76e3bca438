"""Pruning a tiny checkpoint's task vector by saliency."""

from __future__ import annotations

import pytest
import torch

from tiny_checkpoints import build_family
from umtam.checkpoint import load_checkpoint
from umtam.errors import CheckpointError, ConfigError
from umtam.heads import is_head_key
from umtam.prune import prunable_names, prune_checkpoint, write_pruned
from umtam.saliency import keep_count, score, tensor_threshold


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    family = build_family(tmp_path_factory.mktemp("prune-family"), {"mrpc": 2})
    family.add_expert("sst2", seed=5, with_stats=False)
    family.add_expert("rte", seed=6, with_fisher=True)
    return family


@pytest.fixture(scope="module")
def expert(family):
    return family.experts["mrpc"]


def test_keep_one_returns_the_input_bit_for_bit(expert):
    pruned, report = prune_checkpoint(expert, keep=1.0)
    original = expert.load_tensors()
    assert pruned.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(pruned[key], value), key
    assert report.kept_fraction == 1.0


def test_global_prune_keeps_the_fraction_and_resets_the_rest_to_base(family, expert):
    original = expert.load_tensors()
    pruned, report = prune_checkpoint(expert, keep=0.1)
    names = prunable_names(original)
    total = sum(original[n].numel() for n in names)
    # random statistics: no ties, so exactly round(0.1 * N) entries survive
    assert report.kept_entries == keep_count(0.1, total) and report.total_entries == total
    assert report.kept_fraction == pytest.approx(0.1, abs=1 / total)
    for name in names:
        changed = pruned[name] != family.base_encoder[name]
        kept_original = pruned[name] == original[name]
        assert bool((kept_original | ~changed).all())  # every entry is either W or W0
    # the global threshold is the exact k-th largest of all the scores
    stats = expert.load_stats()
    scores = torch.cat([
        score("curvature-row", n, original[n] - family.base_encoder[n], stats, checkpoint_label="x").reshape(-1)
        for n in names
    ])
    assert report.threshold == tensor_threshold(scores, 0.1)


def test_heads_and_vectors_are_kept(expert):
    original = expert.load_tensors()
    pruned, _ = prune_checkpoint(expert, keep=0.05)
    for key, value in original.items():
        if is_head_key(key) or value.dim() < 2:
            assert torch.equal(pruned[key], value), key


def test_tensor_scope_keeps_the_fraction_in_every_tensor_global_does_not(expert):
    _, per_tensor = prune_checkpoint(expert, keep=0.25, scope="tensor")
    _, overall = prune_checkpoint(expert, keep=0.25, scope="global")
    sizes = {name: t.numel() for name, t in expert.load_tensors().items()}
    for name, fraction in per_tensor.tensors.items():
        assert fraction == keep_count(0.25, sizes[name]) / sizes[name]
    assert per_tensor.threshold is None
    spread = [overall.tensors[name] for name in per_tensor.tensors]
    assert max(spread) - min(spread) > 0.1  # a global threshold favours some tensors
    assert overall.kept_fraction == pytest.approx(0.25, abs=0.01)


def test_curvature_needs_statistics_with_a_clear_error(family):
    bare = family.experts["sst2"]
    with pytest.raises(CheckpointError) as caught:
        prune_checkpoint(bare, keep=0.5)
    message = str(caught.value)
    assert str(bare.path) in message and "exp_avg_sq_row/bert." in message
    assert "umtam train" in message and "--score magnitude" in message
    _, report = prune_checkpoint(bare, keep=0.5, score="magnitude")
    assert report.kept_fraction == pytest.approx(0.5, abs=0.01)


def test_fisher_score_when_the_checkpoint_recorded_it(family):
    _, report = prune_checkpoint(family.experts["rte"], keep=0.3, score="fisher", scope="tensor")
    assert report.kept_fraction == pytest.approx(0.3, abs=0.02)
    with pytest.raises(CheckpointError, match="fisher/"):
        prune_checkpoint(family.experts["mrpc"], keep=0.3, score="fisher")


@pytest.mark.parametrize("options,match", [
    ({"keep": 0.0}, "keep"), ({"keep": 1.5}, "keep"), ({"keep": -0.1}, "keep"),
    ({"keep": 0.5, "scope": "layer"}, "scope"), ({"keep": 0.5, "score": "magnitud"}, "did you mean"),
])
def test_bad_options_are_usage_errors(expert, options, match):
    with pytest.raises(ConfigError, match=match):
        prune_checkpoint(expert, **options)


def test_written_checkpoint_sidecar_lineage_and_files(expert, tmp_path):
    written, report = write_pruned(expert, tmp_path / "pruned", keep=0.2, scope="tensor")
    reloaded = load_checkpoint(written.path)
    assert reloaded.kind == "prune"
    # The expert's scores describe the unpruned weights: kept as expert_metrics, metrics left for eval.
    (task, record), = ((name, task.as_json()) for name, task in expert.tasks.items())
    assert reloaded.tasks[task].as_json() == {**{k: v for k, v in record.items() if k != "metrics"},
                                              "metrics": {}, "expert_metrics": record["metrics"]}
    assert reloaded.sidecar.as_json()["base_model"] == expert.sidecar.as_json()["base_model"]
    assert reloaded.sidecar.as_json()["optimizer"] == expert.sidecar.as_json()["optimizer"]
    lineage = reloaded.sidecar.as_json()["lineage"]
    assert lineage["inputs"] == [{"path": str(expert.path.resolve()),
                                  "sha256": expert.sidecar.as_json()["files"]["model.safetensors"]["sha256"]}]
    assert lineage["method"] == {"keep": 0.2, "score": "curvature-row", "scope": "tensor"}
    assert lineage["kept_fraction"] == report.kept_fraction and lineage["threshold"] is None
    for name in ("config.json", "vocab.txt"):
        assert (written.path / name).read_bytes() == (expert.path / name).read_bytes()
    stats, original_stats = reloaded.load_stats(), expert.load_stats()
    assert stats.keys() == original_stats.keys()
    assert all(torch.equal(stats[k], original_stats[k]) for k in stats)
    with pytest.raises(ConfigError, match="already exists"):
        write_pruned(expert, tmp_path / "pruned", keep=0.2)


def test_pruning_a_pruned_checkpoint_keeps_the_original_experts_scores(expert, tmp_path):
    once, _ = write_pruned(expert, tmp_path / "once", keep=0.5)
    twice, _ = write_pruned(once, tmp_path / "twice", keep=0.2)
    (task, record), = expert.tasks.items()
    assert load_checkpoint(twice.path).tasks[task].as_json()["expert_metrics"] == record.metrics
