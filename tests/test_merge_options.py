"""`umtam merge --option KEY=VALUE` through the real CLI: the option reaches the method (the sidecar's
lineage.options records it) and changes the merged weights as the method's formula says."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cli_runner import run_cli
from tiny_checkpoints import build_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("merge-options"), {"mrpc": 2, "sst2": 2})


def merge(family, out, *extra: str) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """TIES-merge the two experts into ``out``: (stdout JSON, sidecar lineage, task vectors of the 2-D weights)."""
    inputs = [str(expert.path) for expert in family.experts.values()]
    code, stdout, stderr = run_cli("merge", *inputs, "--method", "ties", *extra, "-o", str(out), "--json", "--quiet")
    assert code == 0, stderr
    merged = load_file(out / "model.safetensors")
    vectors = {name: merged[name] - base for name, base in family.base_encoder.items() if base.dim() == 2}
    return json.loads(stdout), json.loads((out / "umtam.json").read_text())["lineage"], vectors


@pytest.fixture(scope="module")
def default(family, tmp_path_factory):
    return merge(family, tmp_path_factory.mktemp("ties") / "default")


def test_the_default_ties_options_are_recorded(default):
    report, lineage, vectors = default
    assert lineage["method"] == "ties"
    assert lineage["options"] == report["options"] == {"keep": 0.2, "scope": "global", "agg": "mean",
                                                       "lambda": 1.0, "norms": "base"}
    assert any(vector.abs().max() > 0 for vector in vectors.values())


def test_option_lambda_scales_the_merged_task_vector(family, default, tmp_path):
    report, lineage, vectors = merge(family, tmp_path / "half", "--option", "lambda=0.5")
    assert lineage["options"]["lambda"] == report["options"]["lambda"] == 0.5
    assert {k: v for k, v in lineage["options"].items() if k != "lambda"} == \
        {k: v for k, v in default[1]["options"].items() if k != "lambda"}
    # merged = base + lambda * (elected, trimmed, aggregated task vector)
    for name, vector in default[2].items():
        torch.testing.assert_close(vectors[name], 0.5 * vector, rtol=0, atol=1e-6)


def test_option_agg_sum_adds_the_agreeing_entries_instead_of_averaging(family, default, tmp_path):
    report, lineage, vectors = merge(family, tmp_path / "sum", "--option", "agg=sum")
    assert lineage["options"]["agg"] == report["options"]["agg"] == "sum"
    assert default[1]["options"]["agg"] == "mean"
    # With two experts an entry either one or both kept (and agree on) sums to 1x or 2x their mean.
    ratios = []
    for name, mean in default[2].items():
        kept = mean.abs() > 1e-6
        assert torch.equal(vectors[name].abs() > 1e-6, kept), name  # the same entries survive
        ratios.append(vectors[name][kept] / mean[kept])
    ratios = torch.cat(ratios)
    one, two = (ratios - 1).abs() < 1e-3, (ratios - 2).abs() < 1e-3
    assert bool((one | two).all()) and one.any() and two.any()


def test_a_flag_wins_over_an_option_of_the_same_name(family, tmp_path):
    report, lineage, _ = merge(family, tmp_path / "flag", "--option", "lambda=0.5", "--lambda", "2")
    assert lineage["options"]["lambda"] == report["options"]["lambda"] == 2.0


@pytest.mark.parametrize("option, names", [
    ("drop=0.5", ["'drop'", "ties", "agg, keep, lambda, norms, scope"]),  # DARE's option: ties lists its own
    ("agg=median", ["agg='median'", "mean", "sum"]),
    ("agg", ["--option expects KEY=VALUE, got 'agg'"]),
])
def test_a_bad_option_is_a_usage_error_that_names_it(family, tmp_path, option, names):
    inputs = [str(expert.path) for expert in family.experts.values()]
    code, _, stderr = run_cli("merge", *inputs, "--method", "ties", "--option", option, "-o", str(tmp_path / "m"))
    assert code == 2 and stderr.startswith("umtam: error: ") and len(stderr.splitlines()) == 1
    assert all(name in stderr for name in names), stderr
    assert not (tmp_path / "m").exists()
