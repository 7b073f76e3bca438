"""Why a saliency ranks as it does: the statistics of one expert, tensor by tensor.

    python bench/saliency_stats.py runs/experts/minilm-s43-stsb-umtam-r8-lr0.0002 --keep 0.1
    python bench/saliency_stats.py CKPT [CKPT ...] --scores curvature,magnitude,curvature-tensor

For each 2-D encoder weight of each checkpoint (task vector against its
verified base, statistics from its stats.safetensors) it measures what the
issue-15 hypotheses need: the tensor's curvature scale mean(sqrt R) mean(sqrt C)
against the median tensor's; the rows and columns with zero curvature (no
gradient ever reached them) and how much of |T| sits in them; how peaked R and C
are (max over median); where the dense second moment was recorded (train
--track-fisher), how far Adafactor's rank-1 estimate R C^T / mean(R) that UMTAM
divides by is from it, as the ratio of the two Adam denominators
sqrt(factored) / sqrt(dense) (the step of an entry is off by that factor); and,
per score, which share of the global top-``keep`` budget each module type and
the embeddings take (umtam.saliency_map). Results
go to bench/results/saliency/<checkpoint>.json and a summary is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path("bench/results/saliency")
DEFAULT_SCORES = "curvature,magnitude,second-moment,curvature-tensor,curvature-row"


def tensor_rows(ckpt) -> list[dict]:
    """One row of statistics per 2-D encoder weight."""
    from umtam.base_model import load_base_encoder
    from umtam.families import family_of_dir
    from umtam.heads import is_head_key
    from umtam.prune import prunable_names
    from umtam.saliency import curvature_mean, row_col_factors
    from umtam.saliency_map import module_type
    from umtam.scores import fisher_key

    tensors, stats = ckpt.load_tensors(), ckpt.load_stats()
    family = family_of_dir(ckpt.path)
    base = load_base_encoder(ckpt.sidecar.base_model)
    rows = []
    for name in prunable_names(tensors, is_head=lambda key: is_head_key(key, family)):
        t = tensors[name].float() - base[name].float()
        r, c = row_col_factors(name, t.shape, stats, checkpoint_label=str(ckpt.path))
        r, c = r.clamp_min(0), c.clamp_min(0)
        matrix = t.reshape(t.shape[0], -1).abs()
        rows.append({
            "name": name, "module": module_type(name, family), "shape": list(t.shape),
            "curvature_mean": curvature_mean(name, t.shape, stats, checkpoint_label=str(ckpt.path)),
            "t_rms": float(t.square().mean().sqrt()),
            "zero_rows": float((r == 0).double().mean()), "zero_cols": float((c == 0).double().mean()),
            "abs_t_in_zero_rows": float(matrix[r == 0].sum() / matrix.sum()) if matrix.sum() > 0 else 0.0,
            "r_peak": _peak(r), "c_peak": _peak(c),
            "r_top1pct_share": _top_share(r, 0.01), "c_top1pct_share": _top_share(c, 0.01),
            **_factored_fit(stats.get(fisher_key(name)), r, c),
        })
    return rows


def _factored_fit(dense, r, c) -> dict[str, float]:
    """Adam's denominator from the rank-1 factored second moment against the dense one, entries the gradient reached.

    Both EMAs have the same rate and bias correction, so the ratio is the factorisation's error alone.
    """
    from umtam.optim.functional import factored_rsqrt_denominator

    if dense is None:
        return {}
    factored = factored_rsqrt_denominator(r, c, eps=0.0)  # UMTAM's denominator, eps aside
    dense = dense.float().reshape(factored.shape)
    reached = dense > 0
    ratio = (factored[reached] / dense[reached].sqrt()).log2()
    return {"denominator_log2_ratio_median": float(ratio.median()),
            "denominator_off_2x": float((ratio.abs() > 1).double().mean()),
            "denominator_under_half": float((ratio < -1).double().mean())}


def _peak(values) -> float:
    """max / median of the positive entries: how far one row (or column) stands out."""
    positive = values[values > 0]
    return float(positive.max() / positive.median()) if positive.numel() else 0.0


def _top_share(values, fraction: float) -> float:
    """The share of the sum held by the largest ``fraction`` of entries."""
    k = max(1, round(fraction * values.numel()))
    total = float(values.sum())
    return float(values.topk(k).values.sum()) / total if total > 0 else 0.0


def budget_shares(ckpt, scores: list[str], keep: float) -> dict[str, dict[str, dict[str, float]]]:
    """"by_module" / "by_layer" -> score -> group -> its share of the global top-``keep`` entries.

    A "parameters" row gives each group's share of all entries: what an even spread would take.
    """
    from umtam.saliency_map import saliency_breakdown

    report = saliency_breakdown(ckpt, scores=scores, keep=keep)
    shares = {}
    for grouping in ("by_module", "by_layer"):
        shares[grouping] = {score: {group: cell["topk_share"] for group, cell in data[grouping].items()}
                            for score, data in report["scores"].items()}
        any_score = next(iter(report["scores"].values()))
        shares[grouping]["parameters"] = {group: cell["parameters_share"] for group, cell in any_score[grouping].items()}
    return shares


def share_table(shares: dict[str, dict[str, float]], keep: float, what: str) -> list[str]:
    groups = list(next(iter(shares.values())))
    lines = [f"| share of the top {100 * keep:g}% by {what} | " + " | ".join(groups) + " |",
             "|---|" + "---|" * len(groups)]
    return lines + [f"| {score} | " + " | ".join(f"{100 * by_group.get(g, 0.0):.1f}%" for g in groups) + " |"
                    for score, by_group in shares.items()]


def summarise(name: str, rows: list[dict], shares: dict, keep: float) -> str:
    scales = [row["curvature_mean"] for row in rows]
    median = statistics.median(scales)
    loudest = sorted(rows, key=lambda row: -row["curvature_mean"])[:5]
    lines = [f"**{name}**: {len(rows)} weights; curvature scale max/median {max(scales) / median:.1f}x, "
             f"min/median {min(scales) / median:.3f}x; rows with zero curvature "
             f"{100 * statistics.mean(r['zero_rows'] for r in rows):.2f}% (mean over weights), holding "
             f"{100 * statistics.mean(r['abs_t_in_zero_rows'] for r in rows):.2f}% of |T|; R peak (max/median) "
             f"median {statistics.median(r['r_peak'] for r in rows):.1f}x, C peak "
             f"{statistics.median(r['c_peak'] for r in rows):.1f}x", "",
             "loudest weights: " + "; ".join(f"{r['name']} {r['curvature_mean'] / median:.1f}x" for r in loudest), ""]
    fitted = [r for r in rows if "denominator_off_2x" in r]
    if fitted:
        worst = sorted(fitted, key=lambda r: -r["denominator_off_2x"])[:3]
        lines += [f"factored against dense second moment (Adam denominator ratio, {len(fitted)} weights): median "
                  f"log2 ratio {statistics.median(r['denominator_log2_ratio_median'] for r in fitted):+.2f}, entries "
                  f"off by more than 2x {100 * statistics.mean(r['denominator_off_2x'] for r in fitted):.1f}% "
                  f"(under half: {100 * statistics.mean(r['denominator_under_half'] for r in fitted):.1f}%); worst: "
                  + "; ".join(f"{r['name']} {100 * r['denominator_off_2x']:.0f}%" for r in worst), ""]
    lines += share_table(shares["by_layer"], keep, "layer") + [""] + share_table(shares["by_module"], keep, "module")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--scores", default=DEFAULT_SCORES)
    args = parser.parse_args()
    from umtam.checkpoint import load_checkpoint

    RESULTS.mkdir(parents=True, exist_ok=True)
    scores = args.scores.split(",")
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        rows, shares = tensor_rows(ckpt), budget_shares(ckpt, scores, args.keep)
        name = Path(path).name
        (RESULTS / f"{name}.json").write_text(json.dumps(
            {"checkpoint": name, "keep": args.keep, "tensors": rows, "topk_share": shares}, indent=1) + "\n")
        print(summarise(name, rows, shares, args.keep) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
