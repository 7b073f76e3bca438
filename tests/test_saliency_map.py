"""Where top-k saliency sits (umtam.saliency_map) and what `umtam inspect` shows of it."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cli_runner import run_cli
from tiny_checkpoints import VOCAB, build_family, save_tiny_base, tiny_model
from umtam.checkpoint import write_checkpoint
from umtam.errors import ConfigError
from umtam.merge import merge_checkpoints
from umtam.prune import prune_checkpoint, write_pruned
from umtam.saliency_map import layer_index, module_type, plot_breakdown, saliency_breakdown
from umtam.summary import summarize

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
FFN_IN = "bert.encoder.layer.0.intermediate.dense.weight"
# 2-D encoder entries of the tiny BERT: embeddings 40x8 + 32x8 + 2x8, four 8x8
# attention matrices, 16x8 and 8x16 feed-forward, an 8x8 pooler.
EMBEDDING_ENTRIES, LAYER_ENTRIES, POOLER_ENTRIES = 592, 512, 64
TOTAL_ENTRIES = EMBEDDING_ENTRIES + LAYER_ENTRIES + POOLER_ENTRIES


@pytest.mark.parametrize("name, kind, layer", [
    ("bert.embeddings.word_embeddings.weight", "embeddings", None),
    ("embeddings.position_embeddings.weight", "embeddings", None),  # MiniLM without the bert. prefix
    ("bert.embeddings.LayerNorm.weight", "embeddings", None),
    ("bert.encoder.layer.0.attention.self.query.weight", "query", 0),
    ("encoder.layer.5.attention.self.key.weight", "key", 5),
    ("bert.encoder.layer.11.attention.self.value.bias", "value", 11),
    ("bert.encoder.layer.3.attention.output.dense.weight", "attention_output", 3),
    ("bert.encoder.layer.3.attention.output.LayerNorm.weight", "other", 3),
    ("bert.encoder.layer.10.intermediate.dense.weight", "ffn_in", 10),
    ("bert.encoder.layer.10.output.dense.weight", "ffn_out", 10),
    ("bert.encoder.layer.10.output.LayerNorm.bias", "other", 10),
    ("bert.pooler.dense.weight", "pooler", None),
    ("classifier.weight", "other", None),
    ("distilbert.transformer.layer.2.attention.q_lin.weight", "query", 2),
    ("distilbert.transformer.layer.2.attention.out_lin.weight", "attention_output", 2),
    ("distilbert.transformer.layer.2.ffn.lin1.weight", "ffn_in", 2),
    ("distilbert.transformer.layer.2.ffn.lin2.weight", "ffn_out", 2),
])
def test_module_type_and_layer_index_on_real_names(name, kind, layer):
    assert module_type(name) == kind
    assert layer_index(name) == layer


def test_every_tiny_bert_weight_is_classified():
    names = [n for n, t in tiny_model().state_dict().items() if t.dim() == 2 and not n.startswith("classifier")]
    assert sorted({module_type(n) for n in names}) == sorted(
        ["embeddings", "query", "key", "value", "attention_output", "ffn_in", "ffn_out", "pooler"])


# ----------------------------------------------------------------------------- hand-computed case


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    """Base + a task vector with five known non-zero entries, two in query and three in ffn_in.

    query deltas 3.0, 1.0; ffn_in deltas 2.0, 0.5, 0.4. Statistics are all ones
    except ffn_in's rows (100), so curvature = T^2 on query and 10 T^2 on ffn_in.
    """
    root = tmp_path_factory.mktemp("hand")
    record, base = save_tiny_base(root / "base")
    model = tiny_model(seed=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, tensor in base.items():
        state[name] = tensor.clone()
    state[QUERY][0, 0] += 3.0
    state[QUERY][1, 1] += 1.0
    state[FFN_IN][0, 0] += 2.0
    state[FFN_IN][1, 1] += 0.5
    state[FFN_IN][2, 2] += 0.4
    stats = {}
    for name, tensor in state.items():
        if tensor.dim() == 2:
            stats[f"exp_avg_sq_row/{name}"] = torch.ones(tensor.shape[0])
            stats[f"exp_avg_sq_col/{name}"] = torch.ones(tensor.shape[1])
    stats[f"exp_avg_sq_row/{FFN_IN}"] = torch.full((16,), 100.0)
    sidecar = {"kind": "train", "tasks": {"mrpc": {"label_names": ["a", "b"], "metrics": {}}},
               "base_model": record}
    return write_checkpoint(root / "expert", tensors=state, sidecar=sidecar, stats=stats,
                            extra_files={"config.json": model.config.to_json_string().encode(),
                                         "vocab.txt": VOCAB.encode()})


def test_hand_computed_magnitude_and_curvature_shares(hand_built):
    keep = 4 / TOTAL_ENTRIES  # exactly four entries: the top of the five non-zero ones
    report = saliency_breakdown(hand_built, keep=keep, scores=("curvature", "magnitude", "curvature-row"))
    assert report["layers"] == ["embeddings", "0", "pooler"]
    assert report["entries"] == TOTAL_ENTRIES and report["skipped"] == {}
    cells = dict(zip(report["modules"], zip(*report["parameters_matrix"])))
    assert cells["query"] == (0, 64, 0) and cells["embeddings"] == (EMBEDDING_ENTRIES, 0, 0)

    # magnitude T^2: 9, 1 (query); 4, 0.25, 0.16 (ffn_in) -> top four 9, 4, 1, 0.25
    magnitude = report["scores"]["magnitude"]
    assert magnitude["threshold"] == pytest.approx(0.25, rel=1e-4)
    assert magnitude["topk_entries"] == magnitude["target_entries"] == 4
    assert magnitude["by_module"]["query"]["topk_share"] == 0.5
    assert magnitude["by_module"]["ffn_in"]["topk_share"] == 0.5
    assert magnitude["by_module"]["query"]["mass_share"] == pytest.approx(10 / 14.25, rel=1e-4)
    assert magnitude["by_module"]["ffn_in"]["mass_share"] == pytest.approx(4.25 / 14.25, rel=1e-4)

    # curvature: query 9, 1; ffn_in x10 -> 40, 2.5, 1.6 -> top four 40, 9, 2.5, 1.6
    curvature = report["scores"]["curvature"]
    assert curvature["threshold"] == pytest.approx(1.6, rel=1e-4)
    assert curvature["by_module"]["query"]["topk_share"] == 0.25
    assert curvature["by_module"]["ffn_in"]["topk_share"] == 0.75
    assert curvature["by_module"]["query"]["mass_share"] == pytest.approx(9 / 53.1, rel=1e-4)
    assert curvature["by_module"]["ffn_in"]["mass_share"] == pytest.approx(44.1 / 53.1, rel=1e-4)

    # curvature-row divides each row by its mean sqrt(C): the columns are all ones here, so it is T^2 again
    # (ffn_in's x10 row scale is exactly what it normalises away) and keeps what magnitude keeps
    row = report["scores"]["curvature-row"]
    assert row["threshold"] == pytest.approx(0.25, rel=1e-4)
    assert row["by_module"] == magnitude["by_module"]

    for record in (magnitude, curvature):
        by_layer = record["by_layer"]
        assert by_layer["0"]["topk_share"] == by_layer["0"]["mass_share"] == 1.0
        assert by_layer["embeddings"]["topk"] == by_layer["pooler"]["topk"] == 0
        assert by_layer["embeddings"]["parameters_share"] == EMBEDDING_ENTRIES / TOTAL_ENTRIES
        assert by_layer["pooler"]["parameters_share"] == POOLER_ENTRIES / TOTAL_ENTRIES
        assert record["by_module"]["query"]["parameters"] == 64
        # the matrix is the mass share per (layer, module) cell
        row, col = report["layers"].index("0"), report["modules"].index("query")
        assert record["matrix"][row][col] == record["by_module"]["query"]["mass_share"]


def test_shares_sum_to_one_and_match_prune(tmp_path):
    family = build_family(tmp_path, {"mrpc": 2})
    expert = family.experts["mrpc"]
    report = saliency_breakdown(expert, keep=0.1)
    for score_name, record in report["scores"].items():
        for grouping in ("by_layer", "by_module"):
            for share in ("parameters_share", "topk_share", "mass_share"):
                assert sum(g[share] for g in record[grouping].values()) == pytest.approx(1.0), (grouping, share)
        assert sum(map(sum, record["matrix"])) == pytest.approx(1.0)
        assert record["total_entries"] == report["entries"]
        # the same entries `umtam prune --keep 0.1 --score <score>` keeps
        _, pruned = prune_checkpoint(expert, keep=0.1, score=score_name)
        assert record["threshold"] == pruned.threshold
        assert record["topk_entries"] == pruned.kept_entries


# ----------------------------------------------------------------------------- merge and prune lineage


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    family = build_family(tmp_path_factory.mktemp("merge"), {"mrpc": 2, "sst2": 2})
    checkpoint, _ = merge_checkpoints([family.experts["mrpc"], family.experts["sst2"]],
                                      family.root / "merged", method="average")
    return family, checkpoint


def test_merged_summary_has_lineage_and_expert_metrics(merged):
    family, checkpoint = merged
    summary = summarize(checkpoint)
    lineage = summary["lineage"]
    assert lineage["method"] == "average" and lineage["tasks"] == ["mrpc", "sst2"]
    assert [item["tasks"] for item in lineage["inputs"]] == [["mrpc"], ["sst2"]]
    for item, task in zip(lineage["inputs"], ("mrpc", "sst2")):
        expert = family.experts[task]
        assert item["path"] == str(expert.path.resolve())
        assert item["sha256"] == expert.sidecar.as_json()["files"]["model.safetensors"]["sha256"]
        assert summary["tasks"][task]["expert_metrics"] == expert.tasks[task].as_json()["metrics"]
    assert "saliency" not in summary  # only on request: it needs the base model


def test_merged_saliency_skips_curvature_with_a_note(merged):
    _, checkpoint = merged
    report = summarize(checkpoint, saliency=True, keep=0.2)["saliency"]  # prune's default and magnitude
    assert list(report["scores"]) == ["magnitude"]
    assert "no stats.safetensors" in report["skipped"]["curvature-row"]


def test_pruned_summary_lineage_names_the_method_and_input(tmp_path):
    family = build_family(tmp_path, {"mrpc": 2})
    expert = family.experts["mrpc"]
    pruned, _ = write_pruned(expert, tmp_path / "pruned", keep=0.2)
    lineage = summarize(pruned)["lineage"]
    assert lineage["method"] == "prune"
    assert lineage["options"] == {"keep": 0.2, "score": "curvature-row", "scope": "global"}
    assert lineage["inputs"] == [{"path": str(expert.path.resolve()), "tasks": ["mrpc"],
                                  "sha256": expert.sidecar.as_json()["files"]["model.safetensors"]["sha256"]}]
    assert lineage["kept_fraction"] == pytest.approx(0.2, abs=0.01)


# ----------------------------------------------------------------------------- CLI and plot


def image(path) -> np.ndarray:
    """A PNG file decoded to 8-bit RGB, shape (height, width, 3)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return (imread(path)[..., :3] * 255).round().astype(np.int64)


def viridis(fraction: float) -> np.ndarray:
    """The 8-bit colour a heatmap cell at ``fraction`` of its map's peak is drawn in."""
    import matplotlib

    return np.array(matplotlib.colormaps["viridis"](fraction, bytes=True)[:3], dtype=np.int64)


def near(rgb: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Mask of pixels within 3 levels of ``colour`` per channel (resampling may round a cell by one)."""
    return (np.abs(rgb - colour) <= 3).all(axis=-1)


def cell_colours(row: np.ndarray, min_width: int = 40) -> list[np.ndarray]:
    """Left to right, the colours of the runs of >= min_width equal non-white pixels, repeats merged.

    Cells are ~90 pixels wide at this size; colour bars (7 pixels) and edges are narrower.
    """
    runs, start = [], 0
    for x in range(1, len(row) + 1):
        if x == len(row) or not np.array_equal(row[x], row[start]):
            if x - start >= min_width and not (row[start] == 255).all():
                if not runs or np.abs(runs[-1] - row[start]).max() > 3:
                    runs.append(row[start])
            start = x
    return runs


def test_inspect_plot_writes_a_png_and_json_has_the_breakdown(merged, tmp_path):
    _, checkpoint = merged
    png = tmp_path / "map.png"
    code, stdout, stderr = run_cli("inspect", str(checkpoint.path), "--plot", str(png), "--keep", "0.1", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["plot"] == str(png) and summary["saliency"]["keep"] == 0.1
    assert summary["saliency"]["scores"]["magnitude"]["by_layer"]["0"]["parameters"] == LAYER_ENTRIES
    # the picture is the breakdown the JSON reports (the merge has no statistics: magnitude alone),
    # titled with the checkpoint's path
    drawn = image(png)
    again = plot_breakdown(summary["saliency"], tmp_path / "again.png", title=str(checkpoint.path))
    assert np.array_equal(drawn, image(again))
    # one heatmap: its peak cell is a solid block of the top colour (the colour bar's top is a thin strip)
    assert near(drawn, viridis(1.0)).sum() > 1500


def test_inspect_saliency_tables_and_lineage_rows(merged):
    _, checkpoint = merged
    code, stdout, stderr = run_cli("inspect", str(checkpoint.path), "--saliency")
    assert code == 0, stderr
    for text in ("lineage", "average", "input 1", "expert", "magnitude saliency", "attention_output",
                 "mass / params", "curvature-row saliency skipped"):
        assert text in stdout, text


def test_inspect_maps_the_scores_asked_for_in_their_order(hand_built):
    keep = f"{4 / TOTAL_ENTRIES!r}"
    asked = ("inspect", str(hand_built.path), "--saliency", "--keep", keep, "--scores", "magnitude, curvature")
    code, stdout, stderr = run_cli(*asked, "--json")
    assert code == 0, stderr
    scores = json.loads(stdout)["saliency"]["scores"]  # the JSON's keys are sorted: the tables keep the order
    assert set(scores) == {"magnitude", "curvature"}
    assert scores["curvature"]["threshold"] == pytest.approx(1.6, rel=1e-4)  # the hand-computed case above
    code, stdout, stderr = run_cli(*asked)
    assert code == 0, stderr
    assert 0 <= stdout.index("magnitude saliency") < stdout.index("curvature saliency")
    code, stdout, stderr = run_cli("inspect", str(hand_built.path), "--saliency")
    assert code == 0, stderr
    assert 0 <= stdout.index("curvature-row saliency") < stdout.index("magnitude saliency")  # prune's first


def test_plot_of_both_scores_colours_each_cell_by_its_own_maps_peak(hand_built, tmp_path):
    report = saliency_breakdown(hand_built, keep=4 / TOTAL_ENTRIES, scores=("curvature", "magnitude"))  # as above
    assert list(report["scores"]) == ["curvature", "magnitude"]  # drawn left to right
    rgb = image(plot_breakdown(report, tmp_path / "both.png"))
    # Layer 0's cells: query, key, value, attention_output, ffn_in, ffn_out. Each map is scaled to its
    # own peak: curvature's is ffn_in (44.1 of 53.1), query holds 9 of 53.1 -> 9 / 44.1 of the peak;
    # magnitude's is query (10 of 14.25), ffn_in holds 4.25 of 14.25 -> 4.25 / 10. Empty cells are 0.
    zero = viridis(0.0)
    expected = [viridis(9 / 44.1), zero, viridis(1.0), zero,   # curvature: query | key..attn_out | ffn_in | ffn_out
                viridis(1.0), zero, viridis(4.25 / 10), zero]  # magnitude
    # a pixel row through layer 0, a few pixels below the top of its peak cells (above the labels)
    peak_rows = np.nonzero(near(rgb, viridis(1.0)).sum(axis=1) > 40)[0]
    got = cell_colours(rgb[peak_rows.min() + 4])
    assert len(got) == len(expected)
    for colour, want in zip(got, expected):
        assert np.abs(colour - want).max() <= 3, (colour, want)


@pytest.mark.parametrize("extra, message", [
    (["--keep", "0.1"], "add --saliency or --plot"),
    (["--scores", "magnitude"], "add --saliency or --plot"),
    (["--saliency", "--scores", "magnitude,curvy"], "unknown saliency score 'curvy'"),
    (["--saliency", "--keep", "1.5"], "--keep: must be in (0, 1], got 1.5"),
    (["--plot", "nowhere/map.png"], "does not exist"),
    (["--plot", "map.notanimage"], "unknown image format"),
])
def test_inspect_usage_errors(merged, tmp_path, monkeypatch, extra, message):
    _, checkpoint = merged
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("inspect", str(checkpoint.path), *extra)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_plot_without_matplotlib_names_the_extra(merged, tmp_path, monkeypatch):
    _, checkpoint = merged
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # import now fails
    code, _, stderr = run_cli("inspect", str(checkpoint.path), "--plot", str(tmp_path / "m.png"))
    assert code == 2 and "install umtam[plot]" in stderr
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(ConfigError, match="install umtam"):
        plot_breakdown({"scores": {}, "layers": [], "modules": [], "keep": 0.1}, tmp_path / "m.png")
