"""The benchmark drivers say what they ran: results are named by model and seed, and another's are refused."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def experts(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    module = importlib.import_module("experts")
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    yield module
    sys.modules.pop("experts", None)


def write_result(directory: Path, **fields) -> None:
    row = {"model_tag": "minilm", "task": "mrpc", "optimizer": "umtam", "rank": 8, "lr": 1e-4, "seed": 42,
           "holdout_score": 0.8, "dev_score": 0.8, "dev": {"validation": {"f1": 0.8, "accuracy": 0.8}}, **fields}
    name = f"{row['model_tag']}-s{row['seed']}-{row['task']}-{row['optimizer']}-lr{row['lr']:g}"
    (directory / f"{name}.json").write_text(json.dumps({"name": name, **row}))


def test_run_names_carry_model_and_seed(experts):
    assert experts.run_name("mrpc", "umtam", 8, 1e-4, model="minilm", seed=43) == "minilm-s43-mrpc-umtam-r8-lr0.0001"
    assert experts.run_name("rte", "adamw", 8, 5e-5, ("error_feedback",), seed=7) == "minilm-s7-rte-adamw-ef-lr5e-05"
    assert experts.model_tag(None) == "minilm" == experts.model_tag("sentence-transformers/all-MiniLM-L6-v2")
    assert experts.model_tag("/models/SmolLM2-135M/") == "smollm2-135m"


def test_results_of_another_seed_or_model_are_never_shown_as_this_runs(experts, tmp_path):
    write_result(tmp_path, seed=42)
    write_result(tmp_path, seed=43, dev_score=0.7)
    write_result(tmp_path, seed=42, model_tag="bert-base")
    assert [row["seed"] for row in experts.load_results("minilm", (43,))] == [43]
    assert {row["model_tag"] for row in experts.load_results("minilm")} == {"minilm"}
    with pytest.raises(SystemExit, match=r"no results for model 'minilm' seed\(s\) 7 .*\(it has seed\(s\) 42, 43 "):
        experts.check_results_exist(experts.load_results("minilm", (7,)), "minilm", (7,))


def test_the_quality_table_reports_mean_and_spread_over_seeds(experts, tmp_path):
    for seed, adamw, umtam in ((42, 0.80, 0.82), (43, 0.78, 0.83), (44, 0.79, 0.81)):
        write_result(tmp_path, seed=seed, optimizer="adamw", lr=5e-5, dev_score=adamw)
        write_result(tmp_path, seed=seed, optimizer="umtam", lr=1e-4, dev_score=umtam)
    table = experts.quality_table(experts.load_results("minilm"), (42, 43, 44))
    # adamw 79.00 +- 1.00, umtam 82.00 +- 1.00, paired gaps 2, 5, 2 -> +3.00 +- 1.73
    assert "| 79.00 +- 1.00 |" in table and "| 82.00 +- 1.00 |" in table and "| +3.00 +- 1.73 | 42, 43, 44 |" in table
