"""The benchmark drivers say what they ran: results are named by model and seed, and another's are refused."""

from __future__ import annotations

import importlib
import json
import math
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


def test_the_quality_table_shows_a_task_trained_with_one_optimizer_only(experts, tmp_path):
    write_result(tmp_path, seed=42, optimizer="umtam", lr=2e-4, dev_score=0.775)
    table = experts.quality_table(experts.load_results("minilm"), (42,))
    # no AdamW expert yet: its cells and the gap are dashes, UMTAM's choice and dev still show
    assert "| - | - | 2e-4 (" in table and "| 77.50 | - | 42 |" in table


@pytest.fixture
def lm_grid(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    yield importlib.import_module("lm_grid")
    sys.modules.pop("lm_grid", None)


def _grid_row(optimizer, lr, loss, *, rank=32, steps=60, diverged=False):
    return {"optimizer": optimizer, "rank": rank if optimizer != "adamw" else None, "lr": lr, "steps": steps,
            "seed": 0, "diverged": diverged, "final_val_loss": loss}


def test_lm_grid_regimes_are_the_best_coarse_lr_and_one_step_either_side(lm_grid):
    grid = {"optimizers": ["umtam", "adamw"], "coarse": {"lrs": [1e-4, 1e-3, 1e-2, 1e-1], "rank": 32, "steps": 60},
            "model": str(ROOT / "recipes/models/gpt2-mini"), "seed": 0}
    rows = [_grid_row("umtam", 1e-4, 6.0), _grid_row("umtam", 1e-3, 5.0), _grid_row("umtam", 1e-2, 5.5),
            _grid_row("umtam", 1e-1, 0, diverged=True),
            # adamw's best is the lowest lr: the regimes stay inside the grid, the best becomes "low"
            _grid_row("adamw", 1e-4, 5.0), _grid_row("adamw", 1e-3, 5.2), _grid_row("adamw", 1e-2, 11.5),
            _grid_row("umtam", 1e-2, 1.0, rank=8),  # another rank: not the coarse sweep's
            _grid_row("umtam", 1e-2, 1.0, steps=200)]  # another length: not the coarse sweep's
    assert lm_grid.regimes(grid, rows) == {"umtam": [1e-4, 1e-3, 1e-2], "adamw": [1e-4, 1e-3, 1e-2]}
    # ln(50257) = 10.82: a run that ends above the uniform predictor learned nothing and counts as failed
    assert lm_grid.failed(rows[6], grid) and lm_grid.failed(rows[3], grid) and not lm_grid.failed(rows[5], grid)


def test_lm_grid_cells_group_by_regime_and_rank_with_failures_as_inf(lm_grid):
    grid = {"steps": 200, "model": str(ROOT / "recipes/models/gpt2-mini")}
    chosen = {"umtam": [1e-4, 1e-3, 1e-2]}
    rows = [_grid_row("umtam", 1e-3, 4.0, steps=200), {**_grid_row("umtam", 1e-3, 4.2, steps=200), "seed": 1},
            _grid_row("umtam", 1e-2, 0, steps=200, diverged=True), _grid_row("umtam", 3e-3, 4.0, steps=200)]
    cells = lm_grid.cells(grid, rows, chosen)
    assert cells == {("umtam", "middle", 32): [4.0, 4.2], ("umtam", "high", 32): [float("inf")]}
    assert lm_grid.fmt(cells[("umtam", "middle", 32)]) == "4.100 +- 0.141"
    assert lm_grid.fmt(cells[("umtam", "high", 32)]) == "failed"


def test_lm_grid_plots_one_seeds_line_and_the_seeded_cells_beside_it(lm_grid):
    grid = {"steps": 200, "model": str(ROOT / "recipes/models/gpt2-mini")}
    chosen = {"umtam": [1e-4, 1e-3, 1e-2]}
    rows = [_grid_row("umtam", 1e-3, 4.0, rank=8, steps=200), _grid_row("umtam", 1e-3, 3.0, steps=200),
            {**_grid_row("umtam", 1e-3, 2.0, steps=200), "seed": 1},
            _grid_row("umtam", 1e-3, 0, rank=64, steps=200, diverged=True)]
    one_seed, every_seed = lm_grid.cells(grid, rows, chosen, seed=0), lm_grid.cells(grid, rows, chosen)
    line, seeded = lm_grid.rank_series(one_seed, every_seed, "umtam", "middle", [8, 32, 64])
    # seed 0's loss at r=32 stays on the line (not the two seeds' 2.5); the failed r=64 run is not drawn
    assert line == [(8, 4.0), (32, 3.0)]
    assert seeded == [(32, 2.5, pytest.approx(0.5 ** 0.5))]
    assert lm_grid.rank_series(one_seed, every_seed, "umtam", "high", [8, 32]) == ([], [])


def test_lm_grid_trains_the_middle_regime_first_then_high_then_low(lm_grid):
    grid = {"ranks": [8, 32], "seed": 0, "steps": 200}
    chosen = {"umtam": [1e-4, 1e-3, 1e-2], "adamw": [3e-4, 3e-3, 3e-2]}
    runs = lm_grid.grid_runs(grid, chosen)
    assert [(opt, rank, lr) for opt, rank, lr, _, _ in runs] == [
        ("umtam", 8, 1e-3), ("umtam", 32, 1e-3), ("adamw", 8, 3e-3),
        ("umtam", 8, 1e-2), ("umtam", 32, 1e-2), ("adamw", 8, 3e-2),
        ("umtam", 8, 1e-4), ("umtam", 32, 1e-4), ("adamw", 8, 3e-4)]


def test_lm_grid_seed_table_pairs_each_optimizer_with_umtam_by_seed_and_spreads_use_one_seed(lm_grid):
    grid = {"steps": 200, "seed": 0, "ranks": [8, 32], "seed_ranks": [32], "model": str(ROOT / "recipes/models/gpt2-mini")}
    chosen = {"umtam": [1e-4, 1e-3, 1e-2], "adamw": [1e-4, 1e-3, 1e-2]}

    def run(optimizer, rank, loss, seed):
        return {**_grid_row(optimizer, 1e-3, loss, rank=rank, steps=200), "seed": seed}
    rows = [run("umtam", 8, 4.5, 0), run("umtam", 32, 4.0, 0), run("umtam", 32, 4.2, 1), run("umtam", 32, 4.4, 2),
            run("adamw", None, 4.1, 0), run("adamw", None, 4.1, 1), run("adamw", None, 4.7, 2)]
    one_seed = lm_grid.cells(grid, rows, chosen, seed=0)
    assert one_seed[("umtam", "middle", 32)] == [4.0]
    # the rank spread is seed 0's (4.5 - 4.0), not the three-seed mean's (4.5 - 4.2)
    assert lm_grid.spread([v[0] for r in (8, 32) if (v := one_seed.get(("umtam", "middle", r)))], 2) == "0.500 | 11.8%"
    table = lm_grid.seed_table(grid, rows, chosen, one_seed).splitlines()
    # adamw - umtam per seed: +0.1, -0.1, +0.3
    assert table[2] == "| adamw | - | 0.001 | 0, 1, 2 | 4.300 +- 0.346 | 0.100 +- 0.200 | - |"
    assert table[3] == "| umtam | 32 | 0.001 | 0, 1, 2 | 4.200 +- 0.200 | - | 0.500 |"
    assert lm_grid.spread([4.0, math.inf], 2) == "- (1 failed) | -"
    # a spread over the ranks landed so far says so: it is not yet the claim's
    assert lm_grid.spread([4.0, 4.5], 5) == "0.500 (2 of 5 so far) | 11.8%"
    assert lm_grid.lr_spread_table(grid, {("umtam", "low", 8): [4.6], ("umtam", "middle", 8): [4.5]},
                                   {"umtam": chosen["umtam"]}).splitlines()[2] == "| umtam | 0.100 (2 of 3 so far) | - |"


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    loaded = []

    def load(name):
        loaded.append(name)
        return importlib.import_module(name)
    yield load
    for name in loaded:
        sys.modules.pop(name, None)


def test_decoder_merges_average_normalised_scores_over_the_tasks_that_have_one(bench_module):
    merges = bench_module("merges")
    results = {"choice:sst2": {"score": 0.9, "normalized": 0.8}, "choice:rte": {"score": 0.55, "normalized": None},
               "lm:fineweb": {"score": 20.0, "normalized": 0.9}}
    assert merges.average_kind(results) == "normalized"
    assert merges.average(results) == pytest.approx(0.85)  # rte's expert is near its floor: left out, and named
    assert merges.uncounted(results) == ["choice:rte"]
    glue = {"sst2": {"score": 0.9, "normalized": None}, "rte": {"score": 0.6, "normalized": 0.2}}
    assert merges.average_kind(glue) == "score" and merges.average(glue) == pytest.approx(0.75)
    assert merges.uncounted(glue) == []
    assert merges.task_cell([20.0, 22.0], "lm:fineweb") == "21.00 +- 1.41"  # perplexity as it is
    assert merges.task_cell([0.9], "choice:sst2") == "90.00"  # accuracy in points


def test_decoder_experts_cut_a_one_document_text_into_its_passages(bench_module, tmp_path):
    decoder_experts = bench_module("decoder_experts")
    text = tmp_path / "play" / "train.txt"
    text.parent.mkdir()
    text.write_text("FIRST:\nSpeak.\n\nSECOND:\nI will.\n\n\n\nFIRST:\nThen go.\n")
    decoder_experts.write_passages({"train.jsonl": text}, tmp_path / "out")
    out = tmp_path / "out" / "train.jsonl"
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [
        "FIRST:\nSpeak.", "SECOND:\nI will.", "FIRST:\nThen go."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "play"]  # nothing staged left beside it
    recipe = {"model": "runs/models/smollm2-135m-instruct", "optimizers": {"umtam": {"lr": 2e-4, "rank": 8},
                                                                           "adamw": {"lr": 5e-5}}}
    # the names bench/merges.py finds the checkpoints by: <model>-s<seed>-<expert>
    assert decoder_experts.run_name(recipe, "choice-sst2", "umtam", 42) == (
        "smollm2-135m-instruct-s42-choice-sst2-umtam-r8-lr0.0002")
    assert decoder_experts.run_name(recipe, "lm-fineweb", "adamw", 43) == "smollm2-135m-instruct-s43-lm-fineweb-adamw-lr5e-05"


def test_decoder_experts_score_the_pretrained_model_on_each_experts_own_rows(bench_module, tmp_path):
    from lm_fixtures import write_tiny_decoder
    from umtam import models
    from umtam.config.train import TrainConfig
    from umtam.objectives import language
    from umtam.tasks import task_spec
    from umtam.train import train

    decoder_experts = bench_module("decoder_experts")
    model = write_tiny_decoder(tmp_path / "llama", "llama")
    text = tmp_path / "text"
    text.mkdir()
    sentences = ["the cat sees a bird .", "the dog likes the cat .", "a bird sees the dog ."]
    (text / "train.jsonl").write_text("".join(json.dumps({"text": f"{sentences[i % 3]} {sentences[(i + 1) % 3]}"})
                                              + "\n" for i in range(20)))
    (text / "validation.jsonl").write_text(json.dumps({"text": "a cat likes a dog . the bird sees the cat ."}) + "\n")
    expert = train(TrainConfig(task="lm", model=str(model), data=str(text / "train.jsonl"),
                               eval_data=str(text / "validation.jsonl"), holdout_fraction=decoder_experts.HOLDOUT,
                               optimizer="umtam", rank=2, max_steps=4, batch_size=2, max_length=16, lr=1e-2,
                               output=str(tmp_path / "runs" / "expert")))
    recipe = {"runs_dir": str(tmp_path / "runs"), "model": str(model), "max_eval_samples": 100}
    base = decoder_experts.score_base(recipe, "expert", seed=0)
    # the reference: the pretrained model as transformers loads it, on the validation blocks the expert recorded
    source = models.resolve_model(str(model))
    pretrained, tokenizer = models.load_causal_lm(source), models.load_tokenizer(source)
    (key, record), = expert.tasks.items()
    features = language.validation_features(task_spec("lm"), record, tokenizer, 16)
    reference = language.evaluate(pretrained, features, key, pad_token_id=tokenizer.pad_token_id)
    assert base["task"] == key
    assert base["validation"] == pytest.approx(reference, rel=1e-6)
    assert base["validation"]["tokens"] == record.metrics["validation"]["tokens"]
    # the holdout slice the expert never trained on, where its four steps lowered the perplexity
    holdout = record.holdout_metrics
    assert base["holdout"]["tokens"] == holdout["tokens"] and base["holdout"]["perplexity"] > holdout["perplexity"]


def test_expert_variants_set_by_option_are_named_and_never_chosen(experts):
    name = experts.run_name("cola", "umtam", 8, 1e-4, settings={"warmup_ratio": 0.0, "beta1": 0.8}, seed=43)
    assert name == "minilm-s43-cola-umtam-r8-beta10.8-warmup_ratio0-lr0.0001"
    assert experts.is_variant({"settings": {"beta1": 0.8}}) and not experts.is_variant({"settings": {}})
    args = type("Args", (), {"set": ["warmup_ratio=0", "beta1=0.8"]})()
    assert experts.settings_of(args) == {"warmup_ratio": 0, "beta1": 0.8}


def test_lm_grid_widens_an_optimizers_coarse_sweep_while_its_best_lr_is_on_the_edge(lm_grid):
    grid = {"optimizers": ["umtam", "mofasgd", "adamw", "galore"], "seed": 0,
            "coarse": {"lrs": [1e-3, 3e-3, 1e-2], "rank": 32, "steps": 60},
            "model": str(ROOT / "recipes/models/gpt2-mini")}
    rows = [_grid_row("umtam", 1e-3, 6.0), _grid_row("umtam", 3e-3, 5.0), _grid_row("umtam", 1e-2, 5.5),
            # still improving at the top: one more half-decade up
            _grid_row("mofasgd", 1e-3, 9.0), _grid_row("mofasgd", 3e-3, 8.0), _grid_row("mofasgd", 1e-2, 7.0),
            # best at the bottom: one step down
            _grid_row("adamw", 1e-3, 5.0), _grid_row("adamw", 3e-3, 5.2), _grid_row("adamw", 1e-2, 6.0),
            # the top failed: the best is inside, nothing more
            _grid_row("galore", 1e-3, 6.0), _grid_row("galore", 3e-3, 5.5), _grid_row("galore", 1e-2, 0, diverged=True)]
    assert lm_grid.widening_runs(grid, rows) == [("mofasgd", 32, 0.03, 0, 60), ("adamw", 32, 0.0003, 0, 60)]
    rows += [_grid_row("mofasgd", 0.03, 6.5)]  # the widened run joins the sweep the regimes come from
    assert lm_grid.regimes(grid, rows)["mofasgd"] == [3e-3, 1e-2, 0.03]
    assert lm_grid.ladder_step(0.1, up=True) == 0.3 and lm_grid.ladder_step(1.0, up=True) is None


def test_the_variants_table_puts_each_hypothesis_beside_the_plain_expert_over_its_seeds(experts):
    def row(optimizer, lr, seed, dev, rank=8, **extra):
        # a loss curve whose last 120 steps average 2 * dev: the first 10 steps (9.0) must not count
        return {"task": "cola", "optimizer": optimizer, "rank": rank, "lr": lr, "seed": seed,
                "holdout_score": dev + 0.05, "dev_score": dev, "loss_curve": [9.0] * 10 + [2 * dev] * 120,
                "state_bytes": (rank if optimizer == "umtam" else 100) * 2**20, **extra}

    results = [row("adamw", 5e-5, 42, 0.25), row("adamw", 5e-5, 43, 0.27),
               row("adamw", 5e-5, 42, 0.26, settings={"warmup_ratio": 0}),  # the same variant of AdamW, apart
               row("umtam", 1e-4, 42, 0.20), row("umtam", 1e-4, 43, 0.18),
               row("umtam", 2e-4, 42, 0.10),  # another lr: not the chosen one, left out
               row("umtam", 1e-4, 42, 0.24, settings={"dense_lr": 5e-5}),
               row("umtam", 1e-4, 43, 0.22, settings={"dense_lr": 5e-5}),
               row("umtam", 1e-4, 42, 0.23, error_feedback=True), row("umtam", 1e-4, 42, 0.22, rank=384),
               row("umtam", 1e-4, 42, 0.21, rank=64)]  # ranks in number order: r=64 before r=384
    lines = experts.variants_table(results, (42, 43)).splitlines()[2:]
    assert lines == ["| cola | AdamW | 5e-5 | 100.00 | 0.520 +- 0.028 | 31.00 +- 1.41 | 26.00 +- 1.41 | 42, 43 |",
                     "| cola | AdamW, warmup_ratio=0 | 5e-5 | 100.00 | 0.520 | 31.00 | 26.00 | 42 |",
                     "| cola | plain r=8 | 1e-4 | 8.00 | 0.380 +- 0.028 | 24.00 +- 1.41 | 19.00 +- 1.41 | 42, 43 |",
                     "| cola | dense_lr=5e-05 | 1e-4 | 8.00 | 0.460 +- 0.028 | 28.00 +- 1.41 | 23.00 +- 1.41 | 42, 43 |",
                     "| cola | error-feedback | 1e-4 | 8.00 | 0.460 | 28.00 | 23.00 | 42 |",
                     "| cola | r=64 | 1e-4 | 64.00 | 0.420 | 26.00 | 21.00 | 42 |",
                     "| cola | r=384 | 1e-4 | 384.00 | 0.440 | 27.00 | 22.00 | 42 |"]


def test_settings_without_dev_show_no_dev_cells(bench_module):
    merges = bench_module("merges")
    scored = {"seed": 42, "dev": {"sst2": {"score": 0.9}}, "dev_avg": 0.9, "holdout_avg": 0.8}
    unscored = {"seed": 42, "dev": None, "dev_avg": None, "holdout_avg": 0.85}  # dev_at: chosen, not chosen
    assert merges.dev_cell([scored], "sst2") == "90.00" and merges.dev_cell([unscored], "sst2") == "-"
    assert merges.avg_cell([scored], "dev_avg") == "90.00" and merges.avg_cell([unscored], "dev_avg") == "-"


def test_a_profile_joins_the_model_tag_and_must_say_its_name_and_options(experts, tmp_path):
    profile_file = tmp_path / "profile.yaml"
    profile_file.write_text("name: cpu1k\ntrain: {dtype: bf16, epochs: 1, max_eval_samples: 200}\n")
    profile = experts.load_profile(str(profile_file))
    assert experts.tag_of("runs/models/smollm2-135m-instruct", profile) == "smollm2-135m-instruct+cpu1k"
    assert experts.tag_of(None, None) == "minilm" and experts.eval_cap(profile) == 200
    assert experts.eval_cap(None) == experts.EVAL_CAP
    profile_file.write_text("name: cpu1k\ndtype: bf16\n")  # options outside train: refused, not ignored
    with pytest.raises(SystemExit, match="a profile is"):
        experts.load_profile(str(profile_file))
    assert experts.load_profile(str(ROOT / "recipes/paper/profile-decoder-cpu.yaml"))["train"]["epochs"] == 1


def _merge_row(method, holdout, **options):
    return {"method": method, "options": options, "holdout_avg": holdout, "seed": 42}


def test_merge_sweeps_widen_lambda_keep_and_drop_past_an_edge_choice_but_not_past_keeping_everything(
        bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)
    rows = [_merge_row("ties", 0.60, keep=0.05, **{"lambda": 1.0}), _merge_row("ties", 0.55, keep=0.2),
            _merge_row("ties", 0.58, keep=0.05, **{"lambda": 0.7}),
            _merge_row("dare-ties", 0.5, drop=0.95), _merge_row("dare-ties", 0.6, drop=0.2),
            _merge_row("ota", 0.4, keep=0.5), _merge_row("ota", 0.45, keep=1.0),
            _merge_row("task-arithmetic", 0.5, **{"lambda": 0.5}), _merge_row("task-arithmetic", 0.6, **{"lambda": 1.0}),
            _merge_row("task-arithmetic", 0.55, **{"lambda": 1.5}),
            # the best's keep is the top of those tried, though it is the only keep tried at its lambda
            _merge_row("umtam", 0.5, keep=0.05), _merge_row("umtam", 0.55, keep=0.2),
            _merge_row("umtam", 0.6, keep=0.2, **{"lambda": 1.5})]
    folder = merges.results_dir("sweep", "minilm", 42)
    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(row))
    grid = {"ties": {}, "dare-ties": {}, "ota": {}, "task-arithmetic": {}, "umtam": {}}
    entries = {json.dumps(entry, sort_keys=True) for entry in merges.widening_entries("sweep", "minilm", 42, grid)}
    assert entries == {json.dumps(entry, sort_keys=True) for entry in [("ties", {"keep": 0.025, "lambda": 1.0}),  # half as dense below the lowest keep
                              ("ties", {"keep": 0.05, "lambda": 1.5}),  # lambda's top edge, 1.5x further
                              ("dare-ties", {"drop": 0.1}),  # halfway from keeping 80% to keeping all
                              ("dare-ties", {"drop": 0.2, "lambda": 1.5}),  # one lambda tried: widen upward
                              ("umtam", {"keep": 0.6, "lambda": 1.5}), ("umtam", {"keep": 0.2, "lambda": 2.25})]}
    # (ota's best keeps everything, a bound; task arithmetic's best lambda is inside what it tried)
    assert merges._widen_keep(0.0125, False) is None and merges._widen_drop(0.9875, True) is None  # limits
    assert merges._widen_lambda(6.0, True) is None and merges._widen_lambda(3.0, True) == 4.5
    assert merges.on_edge("keep", 1.0, [{"keep": 0.5}, {"keep": 1.0}]) is False
    assert merges.on_edge("keep", 0.05, [{"keep": 0.05}, {"keep": 1.0}]) is True


def test_the_factored_second_moments_fit_is_the_ratio_of_adam_denominators_where_gradients_reached(bench_module):
    import torch

    stats = bench_module("saliency_stats")
    r, c = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])  # rank-1 estimate: 1 everywhere
    fit = stats._factored_fit(torch.tensor([[1.0, 1.0], [1.0, 16.0]]), r, c)
    # sqrt(1) / sqrt(16) = 1/4: one entry in four steps 4x too large
    assert fit == {"denominator_log2_ratio_median": 0.0, "denominator_off_2x": 0.25, "denominator_under_half": 0.25}
    fit = stats._factored_fit(torch.tensor([[1.0, 0.0], [0.25, 1.0]]), r, c)  # the zero never had a gradient
    assert fit["denominator_off_2x"] == 0.0 and fit["denominator_under_half"] == 0.0  # 1/sqrt(1/4) = 2: not over
    assert stats._factored_fit(None, r, c) == {}  # no dense statistics recorded


def test_lm_grid_cost_table_shows_peak_gpu_memory_only_when_a_run_had_a_gpu(lm_grid):
    grid = {"steps": 200, "model": str(ROOT / "recipes/models/gpt2-mini")}
    cpu = [{**_grid_row("umtam", 1e-3, 7.0, steps=200), "seconds_per_step": 2.0, "state_bytes": 9e6}]
    assert lm_grid.cost_table(grid, cpu).splitlines()[2] == "| umtam | 32 | 1 | 0 | 2.00 | 9.0 |"
    gpu = [{**row, "peak_gpu_bytes": 3.5e9} for row in cpu] + [{**cpu[0], "seconds_per_step": 4.0,
                                                                "peak_gpu_bytes": 2.5e9}]
    assert lm_grid.cost_table(grid, gpu).splitlines()[2] == "| umtam | 32 | 2 | 0 | 3.00 | 9.0 | 3.50 |"


def test_each_seed_chooses_its_own_merge_setting_and_a_setting_one_seed_reached_is_not_averaged_in(
        bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)
    points = {42: [("ties", {"keep": 0.1}, 0.60, 0.50), ("ties", {"keep": 0.2}, 0.55, 0.52)],
              43: [("ties", {"keep": 0.1}, 0.50, 0.48), ("ties", {"keep": 0.2}, 0.58, 0.49),
                   ("ties", {"keep": 0.2, "lambda": 2.0}, 0.70, 0.40)]}  # widened on seed 43 alone
    for seed, rows in points.items():
        folder = merges.results_dir("sweep", "minilm", seed)
        folder.mkdir(parents=True)
        for method, options, holdout, dev in rows:
            row = {"method": method, "options": options, "holdout_avg": holdout, "dev_avg": dev, "seed": seed}
            (folder / f"{merges.label(method, options)}.json").write_text(json.dumps(row))
    rows = merges.all_rows("sweep", "minilm", (42, 43))
    choices = merges.seed_choices(rows, (42, 43), "ties", "holdout_avg")
    assert {seed: row["options"] for seed, row in choices.items()} == {42: {"keep": 0.1}, 43: {"keep": 0.2, "lambda": 2.0}}
    swept = [options for rows in points.values() for _, options, _, _ in rows]
    assert merges.setting_cell(choices, swept) == "s42: keep=0.1 (edge); s43: keep=0.2 (edge), lambda=2.0"
    oracle = merges.seed_choices(rows, (42, 43), "ties", "dev_avg")
    assert [row["dev_avg"] for row in oracle.values()] == [0.52, 0.49]
    assert merges.setting_cell(oracle, swept) == "keep=0.2 (edge)"  # both seeds: shown once


def test_the_paired_table_differences_each_seeds_choice_from_umtams_on_the_same_seed(
        bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)
    points = {42: [("umtam", {"keep": 0.2}, 0.60, 0.52), ("ties", {"keep": 0.1}, 0.58, 0.50),
                   ("ties", {"keep": 0.2}, 0.50, 0.55)],  # better on dev, not chosen
              43: [("umtam", {"keep": 0.2}, 0.61, 0.50), ("ties", {"keep": 0.1}, 0.55, 0.51)]}
    for seed, rows in points.items():
        folder = merges.results_dir("sweep", "minilm", seed)
        folder.mkdir(parents=True)
        for method, options, holdout, dev in rows:
            row = {"method": method, "options": options, "holdout_avg": holdout, "dev_avg": dev, "seed": seed,
                   "experts": [], "holdout": {"sst2": {"score": holdout}}, "dev": {"sst2": {"score": dev}}}
            (folder / f"{merges.label(method, options)}.json").write_text(json.dumps(row))
    lines = merges.paired_table("sweep", "minilm", (42, 43)).splitlines()
    # ties minus umtam: 0.50 - 0.52 and 0.51 - 0.50, in points; no expert results, so nothing to normalise by
    assert lines[2:] == ["| ties | -0.50 +- 2.12 | n/a | 42, 43 |"]


def _write_rows(merges, name: str, seed: int, rows: list[dict]) -> None:
    folder = merges.results_dir(name, "minilm", seed)
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        (folder / f"{merges.label(row['method'], row['options'])}.json").write_text(json.dumps({"seed": seed, **row}))


def test_the_ablation_table_groups_each_variant_over_the_settings_its_seeds_chose(bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)
    sweep = {42: [({"keep": 0.6}, 0.50), ({"keep": 0.2}, 0.40)],
             43: [({"keep": 0.05, "lambda": 2.0}, 0.50), ({"keep": 0.025, "lambda": 2.0}, 0.45)]}
    for seed, rows in sweep.items():  # the set the ablation takes each seed's choice from
        _write_rows(merges, "sweep", seed, [{"method": "umtam", "options": o, "holdout_avg": h} for o, h in rows])
    points = {42: [({"keep": 0.6}, 0.52), ({"keep": 0.6, "trim": "magnitude"}, 0.48)],
              43: [({"keep": 0.05, "lambda": 2.0}, 0.54), ({"keep": 0.05, "lambda": 2.0, "trim": "magnitude"}, 0.53),
                   # run when seed 43 chose keep 0.025 (its choice moved since): sorts first, never shown
                   ({"keep": 0.025, "lambda": 2.0}, 0.90), ({"keep": 0.025, "lambda": 2.0, "trim": "magnitude"}, 0.10)]}
    for seed, rows in points.items():
        _write_rows(merges, "ablation", seed, [
            {"method": "umtam", "options": options, "holdout_avg": dev, "dev_avg": dev, "experts": [],
             "holdout": {"sst2": {"score": dev}}, "dev": {"sst2": {"score": dev}}} for options, dev in rows])
    grid = {"umtam": [{}, {"trim": "magnitude"}]}
    lines = merges.ablation_table("ablation", "minilm", (42, 43), grid, "sweep").splitlines()
    assert lines[2:] == ["| umtam | 53.00 +- 1.41 | n/a | 0.00 +- 0.00 | 42, 43 |",
                         "| umtam-trimmagnitude | 50.50 +- 3.54 | n/a | -2.50 +- 2.12 | 42, 43 |"]


def test_an_entry_taken_from_a_set_that_never_ran_its_method_is_refused(bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)
    _write_rows(merges, "sweep", 42, [{"method": "ties", "options": {"keep": 0.1}, "holdout_avg": 0.5}])
    assert merges.on_chosen([("ties", {"lambda": 2.0})], "sweep", "minilm", 42) == [("ties", {"keep": 0.1, "lambda": 2.0})]
    with pytest.raises(SystemExit, match="'sweep' has no umtam result for model 'minilm', seed 42"):
        merges.on_chosen([("umtam", {})], "sweep", "minilm", 42)  # not umtam's defaults posing as its choice
    with pytest.raises(SystemExit, match="'sweep' has no ties result for model 'minilm', seed 43"):
        merges.on_chosen([("ties", {})], "sweep", "minilm", 43)


def test_a_sweep_resumes_only_onto_results_of_its_own_experts(bench_module, tmp_path):
    merges = bench_module("merges")
    stored = tmp_path / "ties.json"
    stored.write_text(json.dumps({"experts": ["runs/experts/minilm-s42-rte-umtam-r8-lr5e-05",
                                              "runs/experts/minilm-s42-mrpc-umtam-r8-lr1e-4"]}))
    same = [Path("elsewhere/minilm-s42-rte-umtam-r8-lr5e-05"), Path("elsewhere/minilm-s42-mrpc-umtam-r8-lr1e-4")]
    merges.check_same_experts(stored, same)  # another runs_dir, the same checkpoints
    with pytest.raises(SystemExit, match="merged minilm-s42-rte-umtam-r8-lr5e-05, minilm-s42-mrpc-umtam-r8-lr1e-4, "
                                         "not this recipe's experts"):
        merges.check_same_experts(stored, [Path("runs/experts/minilm-s42-rte-umtam-r8-lr0.0002"), same[1]])
    with pytest.raises(SystemExit, match="not this recipe's experts"):
        merges.check_same_experts(stored, same[:1])
    stored.write_text(json.dumps({"experts": ["runs/experts/rte-umtam-r8-lr5e-05", "runs/experts/mrpc-umtam-r8-lr1e-4"]}))
    merges.check_same_experts(stored, same)  # written before names carried model and seed


def test_a_decoder_sets_averages_count_only_tasks_normalised_on_every_split_scored(bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)

    def results(sst2: float, rte: float | None, text: float) -> dict:
        return {"choice:sst2": {"score": 0.9, "normalized": sst2}, "choice:rte": {"score": 0.7, "normalized": rte},
                "lm:fineweb": {"score": 30.0, "normalized": text}}

    # rte's expert clears its floor on dev but not on the holdout: the choice could not count it
    chosen = {"method": "fisher", "options": {}, "avg_is": "normalized", "holdout": results(0.8, None, 0.9),
              "holdout_avg": 0.85, "dev": results(0.7, 0.1, 0.9), "dev_avg": 0.5667, "uncounted": ["choice:rte"]}
    other = {"method": "average", "options": {}, "avg_is": "normalized", "holdout": results(0.6, None, 0.8),
             "holdout_avg": 0.7, "dev": None, "dev_avg": None, "uncounted": ["choice:rte"]}
    _write_rows(merges, "decoder", 42, [chosen, other])
    rows = {row["method"]: row for row in merges.all_rows("decoder", "minilm", (42,))}
    assert rows["fisher"]["dev_avg"] == pytest.approx(0.8)  # (0.7 + 0.9) / 2, rte left out as on the holdout
    assert rows["fisher"]["holdout_avg"] == pytest.approx(0.85) and rows["average"]["holdout_avg"] == pytest.approx(0.7)
    assert rows["fisher"]["uncounted"] == rows["average"]["uncounted"] == ["choice:rte"]
    glue = [{"method": "ties", "options": {}, "holdout": {"rte": {"score": 0.6}}, "holdout_avg": 0.6}]
    assert merges.recount_decoder_averages(glue) == glue  # GLUE rows average their raw scores, as they are


@pytest.fixture
def prune_sweep(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    yield importlib.import_module("prune_sweep")
    sys.modules.pop("prune_sweep", None)


def test_a_cell_counts_beyond_the_spread_only_where_its_mean_gap_exceeds_its_std(prune_sweep):
    gaps = [[0.02, 0.03, 0.04],     # mean 0.03 > std 0.01: ahead
            [-0.05, -0.06, -0.04],  # behind
            [0.05, -0.03, 0.01],    # mean 0.01 < std 0.04: a tie
            [0.09]]                 # one seed has no spread: never counted
    assert prune_sweep.beyond_spread(gaps) == (1, 1)


def test_cell_gaps_pair_each_score_with_magnitude_by_seed(prune_sweep):
    sweep = {"experts": ["mrpc-umtam-r8-lr0.0001"], "keeps": [0.1, 0.2]}
    points = {"mrpc-umtam-r8-lr0.0001": {
        42: [{"score": "curvature", "keep": 0.1, "dev_score": 0.70}, {"score": "magnitude", "keep": 0.1, "dev_score": 0.75},
             {"score": "curvature", "keep": 0.2, "dev_score": 0.80}],  # no magnitude at 20%: that cell is left out
        43: [{"score": "curvature", "keep": 0.1, "dev_score": 0.72}, {"score": "magnitude", "keep": 0.1, "dev_score": 0.71},
             {"score": "curvature", "keep": 0.2, "dev_score": 0.81}, {"score": "magnitude", "keep": 0.2, "dev_score": 0.8}]}}
    (gaps,) = prune_sweep.cell_gaps(sweep, points, "curvature")
    assert gaps == pytest.approx([-0.05, 0.01])


def _tiny_grid(tmp_path, tokenizer):
    from lm_fixtures import write_text_corpus

    corpus = write_text_corpus(tmp_path / "text")
    config_only = tmp_path / "gpt2-config"
    config_only.mkdir()
    (config_only / "config.json").write_text((tokenizer / "config.json").read_text())
    return {"name": "tiny", "model": str(config_only), "tokenizer": str(tokenizer),
            "data": str(corpus / "train.txt"), "eval_data": str(corpus / "validation.jsonl"), "batch_size": 2,
            "max_length": 16, "eval_every": 2, "max_eval_samples": 4, "warmup_ratio": 0.0, "weight_decay": 0.0,
            "dtype": "fp32", "runs_dir": str(tmp_path / "runs")}


def test_lm_grid_records_a_divergence_as_a_result_but_stops_on_a_set_up_error(lm_grid, tmp_path):
    from lm_fixtures import write_tiny_decoder

    from umtam.errors import DivergenceError, UmtamError

    grid = _tiny_grid(tmp_path, write_tiny_decoder(tmp_path / "gpt2", "gpt2"))
    exploded = lm_grid.train_one(grid, "adamw", 8, 1e30, 0, 3, keep=False)
    assert exploded["diverged"] and exploded["error"].startswith("training diverged at step")
    fine = lm_grid.train_one(grid, "adamw", 8, 1e-3, 0, 3, keep=False)
    assert not fine["diverged"] and math.isfinite(fine["final_val_loss"])
    with pytest.raises(UmtamError) as missing:  # once recorded as a "divergence" (0 s) in every cell it touched
        lm_grid.train_one({**grid, "tokenizer": str(tmp_path / "no-tokenizer")}, "adamw", 8, 1e-3, 0, 3, keep=False)
    assert "no-tokenizer" in str(missing.value) and not isinstance(missing.value, DivergenceError)


def test_a_sweep_splits_across_processes_by_method_and_experts_by_name(experts):
    subset = experts.named_subset
    grid = {"average": {}, "ties": {"keep": [0.2]}, "umtam": {"keep": [0.2]}}
    assert subset(grid, "umtam,average", "--methods") == {"average": {}, "umtam": {"keep": [0.2]}}
    with pytest.raises(SystemExit, match="--methods fisher: not in the recipe's grid"):
        subset(grid, "fisher,ties", "--methods", "the recipe's grid")
    recipe = {"choice-sst2": {}, "choice-rte": {}, "lm-fineweb": {}}
    assert list(subset(recipe, "lm-fineweb,choice-sst2", "--experts")) == ["choice-sst2", "lm-fineweb"]
    assert subset(recipe, None, "--experts") is recipe
    with pytest.raises(SystemExit, match="--optimizers sgd: not in the recipe"):
        subset({"umtam": {}}, "sgd", "--optimizers")


def test_dev_is_scored_only_for_the_methods_this_process_swept(bench_module, tmp_path, monkeypatch):
    """Another process sweeping other methods into the same folder may not have chosen yet."""
    merges = bench_module("merges")
    rows = [{"method": "ties", "dev": None}, {"method": "umtam", "dev": None}]
    monkeypatch.setattr(merges, "all_rows", lambda name, tag, seeds: rows)
    asked = []
    monkeypatch.setattr(merges, "seed_choices", lambda rows, seeds, method, key: asked.append(method) or {})
    merges.score_chosen_on_dev("set", "tag", (42,), lambda seed: [], None, methods={"umtam"})
    assert asked == ["umtam"]


def test_merges_wait_for_each_expert_until_its_sidecar_lands_and_give_up_in_one_line(bench_module, tmp_path):
    import threading

    merges = bench_module("merges")
    whole, training = tmp_path / "whole", tmp_path / "training"
    whole.mkdir()
    (whole / "umtam.json").write_text("{}")
    training.mkdir()  # a checkpoint being written has its weights before its sidecar
    merges.wait_for_experts([whole], minutes=0.001, poll_seconds=0.001)
    with pytest.raises(SystemExit, match=r"after 0.003 min 1 expert checkpoint\(s\) still missing, the first .*training"):
        merges.wait_for_experts([whole, training], minutes=0.003, poll_seconds=0.01)
    lands = threading.Timer(0.05, lambda: (training / "umtam.json").write_text("{}"))
    lands.start()
    merges.wait_for_experts([whole, training], minutes=1, poll_seconds=0.01)
    lands.join()


def test_a_decoder_merge_table_shows_its_normalised_average_once_and_names_the_tasks_it_leaves_out(
        bench_module, tmp_path, monkeypatch):
    merges = bench_module("merges")
    monkeypatch.setattr(merges, "RESULTS", tmp_path)
    folder = merges.results_dir("decoder", "smollm2", 42)
    folder.mkdir(parents=True)
    def tasks(sst2: float, normalized: tuple[float, float]) -> dict:
        return {"choice:rte": {"score": 0.5, "normalized": None},
                "choice:sst2": {"score": sst2, "normalized": normalized[0]},
                "lm:fineweb": {"score": 33.0, "normalized": normalized[1]}}

    # (sst2's, fineweb's normalised score) per split: averages 0.90 / 0.80 for umtam, 0.84 / 0.85 for ties
    for method, holdout, dev, sst2 in (("umtam", (0.85, 0.95), (0.70, 0.90), 0.86),
                                       ("ties", (0.78, 0.90), (0.80, 0.90), 0.88)):
        row = {"method": method, "options": {}, "seed": 42, "experts": [], "avg_is": "normalized",
               "holdout": tasks(sst2, holdout), "holdout_avg": sum(holdout) / 2, "dev": tasks(sst2, dev),
               "dev_avg": sum(dev) / 2, "uncounted": ["choice:rte"]}
        (folder / f"{method}.json").write_text(json.dumps(row))
    chosen = merges.chosen_table("decoder", "smollm2", (42,)).splitlines()
    assert chosen[0] == ("| method | chosen by | setting | choice:rte | choice:sst2 | lm:fineweb | dev avg (normalised) "
                         "| seeds |")
    assert chosen[2:4] == ["| ties | holdout | - | 50.00 | 88.00 | 33.00 | 85.0% | 42 |",  # no second normalisation
                           "| umtam | holdout | - | 50.00 | 86.00 | 33.00 | 80.0% | 42 |"]
    assert chosen[-1].endswith("under 10 points above its floor: choice:rte")
    report = merges.report("decoder", "smollm2", (42,)).splitlines()
    assert report[2].startswith("| umtam | 90.0% | 80.0% | 50.00 |")
    paired = merges.paired_table("decoder", "smollm2", (42,)).splitlines()
    assert paired[2:] == ["| ties | 5.00 | 42 |"]  # 85.0% - 80.0%, in points of the normalised average
