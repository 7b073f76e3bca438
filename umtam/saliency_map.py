"""Where a checkpoint's top-k saliency sits: by layer and by module type.

``saliency_breakdown`` answers "which parts of the encoder did fine-tuning
move in ways that matter?" for one checkpoint. For each score (default
prune's curvature-row and magnitude, umtam.scores) it finds the global top-``keep``
cut over all 2-D encoder weights (the entries ``umtam prune --keep`` would
keep: the same exact k, ties at the threshold broken in the same fixed order,
saliency.Selection), then reports, per layer and per module type,

    parameters_share   the group's share of all 2-D encoder entries
    topk_share         its share of the k entries kept
    mass_share         its share of the saliency summed over those entries

so a group whose topk_share exceeds its parameters_share is over-represented
in what pruning or merging keeps. ``matrix`` holds mass_share per (layer,
module type) cell, for a heatmap (``plot_breakdown``).

Memory: the checkpoint and the base encoder, one model each (as in prune);
scores exist one tensor at a time per score, plus the two histograms per
score that saliency.streaming_cuts needs. Three passes over the tensors: two
to find the exact cuts, one to tally.

Module types come from the checkpoint's model family (umtam.families: BERT,
RoBERTa and MiniLM names, DistilBERT's ``q_lin``, ``ffn.lin1``, ...); anything
else counts as "other".
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from umtam.base_model import check_base_covers, load_base_encoder
from umtam.checkpoint import Checkpoint, load_checkpoint
from umtam.errors import ConfigError, UmtamError
from umtam.families import ModelFamily, family_of_dir, generic_family
from umtam.heads import is_head_key
from umtam.plots import agg_canvas
from umtam.prune import prunable_names
from umtam.saliency import check_keep, keep_count
from umtam.saliency import score as saliency_score
from umtam.saliency import Cut, Selection, streaming_cuts
from umtam.scores import INSPECT_SCORES, SCORES, required_stats

ScoresOf = Callable[[str], list[Tensor]]

# Every family's module types, in the order the map's columns show them (umtam.families declares them).
MODULE_TYPES = ("embeddings", "query", "key", "value", "qkv", "attention_output", "ffn_gate", "ffn_in", "ffn_out",
                "pooler", "lm_head", "other")

# ----------------------------------------------------------------------------- names


def module_type(name: str, family: ModelFamily | None = None) -> str:
    """The module type of a parameter name: one of MODULE_TYPES (the family's names; any family's without one)."""
    return (family or generic_family()).module_type(name)


def layer_index(name: str, family: ModelFamily | None = None) -> int | None:
    """The layer index in a parameter name (the family's pattern), or None outside the layer stack."""
    return (family or generic_family()).layer_index(name)


def layer_group(name: str, family: ModelFamily | None = None) -> str:
    """The row a parameter belongs to: "embeddings", "<i>", "pooler" or "other"."""
    kind = module_type(name, family)
    if kind in ("embeddings", "pooler"):
        return kind
    index = layer_index(name, family)
    return "other" if index is None else str(index)


def _layer_order(group: str) -> tuple[int, int]:
    # embeddings first, then layers in numeric (not string) order, pooler, other.
    fixed = {"embeddings": (0, 0), "pooler": (2, 0), "other": (3, 0)}
    return fixed.get(group, (1, int(group) if group.isdigit() else 0))


# ----------------------------------------------------------------------------- breakdown


def saliency_breakdown(checkpoint, *, scores: Iterable[str] = INSPECT_SCORES, keep: float = 0.05,
                       base: str | None = None) -> dict[str, Any]:
    """Top-``keep`` saliency of ``checkpoint`` by layer and module type, as JSON-ready data.

    ``checkpoint`` is a Checkpoint or a directory; ``base`` overrides where the
    base model is found (checked against the recorded fingerprint). A score whose
    statistics the checkpoint lacks (curvature on a merge, which carries none) is
    listed under "skipped" with the reason instead of failing the whole report.
    """
    keep = check_keep(keep)
    requested = list(dict.fromkeys(scores))
    for name in requested:
        SCORES.get(name)  # an unknown score is a usage error before any loading
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    tensors, stats = ckpt.load_tensors(), ckpt.load_stats()
    family = family_of_dir(ckpt.path)
    names = prunable_names(tensors, is_head=lambda key: is_head_key(key, family))
    params = _params_per_cell(names, tensors, family)
    layers = sorted({layer for layer, _ in params}, key=_layer_order)
    modules = [kind for kind in MODULE_TYPES if any(kind == m for _, m in params)]
    if names:
        usable, skipped = _usable_scores(requested, names, tensors, stats)
    else:
        usable, skipped = [], {score_name: "no 2-D encoder weights" for score_name in requested}
    report: dict[str, Any] = {
        "keep": keep, "scores": {}, "skipped": skipped, "layers": layers, "modules": modules,
        "tensors": len(names), "entries": sum(params.values()),
        # Entries per cell: tells a real 0% (nothing salient) from a cell with no tensor.
        "parameters_matrix": [[params.get((layer, kind), 0) for kind in modules] for layer in layers],
    }
    if not usable:
        return report
    scores_of = _scorer(ckpt, tensors, stats, names, usable, base)
    cuts = _cuts(names, scores_of, keep)
    for score_name, cut, tally in zip(usable, cuts, _tally(names, scores_of, cuts, family)):
        report["scores"][score_name] = _score_report(cut.threshold, tally, params, layers, modules, keep)
    return report


def _scorer(ckpt: Checkpoint, tensors: Mapping[str, Tensor], stats: Mapping[str, Tensor], names: Sequence[str],
            usable: Sequence[str], base: str | None) -> ScoresOf:
    """name -> one score tensor per usable score, from the task vector against the verified base."""
    label = str(ckpt.path)
    base_tensors = load_base_encoder(ckpt.sidecar.base_model, override=base)
    check_base_covers(base_tensors, {name: tuple(tensors[name].shape) for name in names}, label,
                      dtypes={name: tensors[name].dtype for name in names})

    def scores_of(name: str) -> list[Tensor]:
        # One task vector feeds every score, so each pass reads a tensor once.
        task_vector = tensors[name].to(torch.float32) - base_tensors[name].to(torch.float32)
        return [saliency_score(s, name, task_vector, stats, checkpoint_label=label) for s in usable]

    return scores_of


def _usable_scores(requested: Sequence[str], names: Sequence[str], tensors: Mapping[str, Tensor],
                   stats: Mapping[str, Tensor]) -> tuple[list[str], dict[str, str]]:
    """Split scores into those the statistics support and those skipped, with why."""
    usable, skipped = [], {}
    for score_name in requested:
        missing = next((key for name in names for key in required_stats(score_name, name, tensors[name].dim())
                        if key not in stats), None)
        if missing is None:
            usable.append(score_name)
        elif not stats:
            skipped[score_name] = "the checkpoint has no stats.safetensors (a merge carries none)"
        else:
            skipped[score_name] = f"its stats.safetensors has no {missing!r}"
    return usable, skipped


def _cuts(names: Sequence[str], scores_of: ScoresOf, keep: float) -> list[Cut]:
    """The exact global cut of every score, found together in two streaming passes."""

    def batches():
        for name in names:
            yield scores_of(name)

    return streaming_cuts(batches, keep)


class _Tally:
    """Top-k entries and their summed saliency per (layer, module) cell, for one score."""

    def __init__(self) -> None:
        self.count: dict[tuple[str, str], int] = defaultdict(int)
        self.mass: dict[tuple[str, str], float] = defaultdict(float)


def _tally(names: Sequence[str], scores_of: ScoresOf, cuts: Sequence[Cut], family: ModelFamily) -> list[_Tally]:
    tallies = [_Tally() for _ in cuts]
    selections = [Selection(cut) for cut in cuts]  # prune's rule: names in order, ties in row-major order
    for name in names:
        cell = (layer_group(name, family), module_type(name, family))
        for tally, selection, scores in zip(tallies, selections, scores_of(name)):
            kept = scores[selection.mask(scores)]
            tally.count[cell] += int(kept.numel())
            # float64: the mass of a large model would lose the small cells in float32.
            tally.mass[cell] += float(kept.sum(dtype=torch.float64))
    return tallies


def _params_per_cell(names: Sequence[str], tensors: Mapping[str, Tensor],
                     family: ModelFamily) -> dict[tuple[str, str], int]:
    params: dict[tuple[str, str], int] = defaultdict(int)
    for name in names:
        params[(layer_group(name, family), module_type(name, family))] += int(tensors[name].numel())
    return params


def _score_report(threshold: float, tally: _Tally, params: Mapping[tuple[str, str], int],
                  layers: Sequence[str], modules: Sequence[str], keep: float) -> dict[str, Any]:
    total_params = sum(params.values())
    total_count = sum(tally.count.values())
    total_mass = sum(tally.mass.values())

    def group(cells: list[tuple[str, str]]) -> dict[str, Any]:
        n = sum(params.get(c, 0) for c in cells)
        count = sum(tally.count.get(c, 0) for c in cells)
        mass = sum(tally.mass.get(c, 0.0) for c in cells)
        return {"parameters": n, "topk": count, "mass": mass,
                "parameters_share": _share(n, total_params), "topk_share": _share(count, total_count),
                "mass_share": _share(mass, total_mass)}

    present = list(params)
    return {
        "threshold": threshold,
        "target_entries": keep_count(keep, total_params),
        "topk_entries": total_count,
        "total_entries": total_params,
        "topk_mass": total_mass,
        "by_layer": {layer: group([c for c in present if c[0] == layer]) for layer in layers},
        "by_module": {kind: group([c for c in present if c[1] == kind]) for kind in modules},
        # rows follow "layers", columns "modules"; a cell with no tensor is 0.
        "matrix": [[_share(tally.mass.get((layer, kind), 0.0), total_mass) for kind in modules]
                   for layer in layers],
    }


def _share(part: float, whole: float) -> float:
    # All-zero scores (an untouched checkpoint) have no mass to share: report 0, not NaN.
    return part / whole if whole > 0 else 0.0


# ----------------------------------------------------------------------------- plot


def check_plot_path(path: str | Path) -> Path:
    """Fail before any work when a plot cannot be written: no matplotlib, bad folder or format."""
    target = Path(path)
    formats = agg_canvas().get_supported_filetypes()
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write plot {target}: folder {target.parent} does not exist")
    suffix = target.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ConfigError(f"cannot write plot {target}: unknown image format {target.suffix or '(none)'!r}",
                          hint=f"use a file name ending in .png (or one of {', '.join(sorted(formats))})")
    return target


def plot_breakdown(breakdown: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Draw the layer x module-type top-k mass share of every score side by side, to ``path``."""
    target = check_plot_path(path)
    scored = breakdown["scores"]
    if not scored:
        reasons = "; ".join(f"{k}: {v}" for k, v in breakdown.get("skipped", {}).items()) or "no scores"
        raise UmtamError(f"nothing to plot ({reasons})")
    figure = _heatmaps(scored, breakdown["layers"], breakdown["modules"], breakdown["keep"],
                       breakdown.get("parameters_matrix"))
    if title:
        figure.suptitle(title)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    return target


def _heatmaps(scored: Mapping[str, Any], layers: Sequence[str], modules: Sequence[str], keep: float,
              parameters: Sequence[Sequence[int]] | None):
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    canvas_class = agg_canvas()
    width = max(4.0, 0.8 * len(modules) + 1.5)
    height = max(3.0, 0.45 * len(layers) + 1.5)
    figure = Figure(figsize=(width * len(scored), height), layout="constrained")
    canvas_class(figure)
    axes = figure.subplots(1, len(scored), squeeze=False)[0]
    for ax, (score_name, record) in zip(axes, scored.items()):
        matrix = 100 * np.asarray(record["matrix"], dtype=np.float64)
        peak = max(float(matrix.max()), 1e-12)
        if parameters:
            # Cells without a tensor (a query in the embeddings row) are left blank, not 0%.
            matrix = np.where(np.asarray(parameters) > 0, matrix, np.nan)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
        image = ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=peak, aspect="auto")
        _annotate(ax, matrix, peak)
        ax.set_xticks(range(len(modules)), labels=list(modules), rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), labels=[_row_label(layer) for layer in layers])
        ax.set_title(f"{score_name}: top {_percent(keep)} saliency mass")
        figure.colorbar(image, ax=ax, label="% of top-k saliency mass")
    return figure


def _annotate(ax, matrix, peak: float) -> None:
    # Percent labels make a small map readable without looking up the colour bar.
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            value = float(matrix[row, col])
            if value == value:  # not NaN: the cell has a tensor
                colour = "black" if value > 0.6 * peak else "white"
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7, color=colour)


def _row_label(layer: str) -> str:
    return f"layer {layer}" if layer.isdigit() else layer


def _percent(keep: float) -> str:
    return f"{100 * keep:.4g}%"
