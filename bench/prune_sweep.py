"""Pruning sweep (the paper's section 4.2): curvature against magnitude saliency at several densities.

    python bench/prune_sweep.py --config recipes/paper/prune-sweep.yaml
    python bench/prune_sweep.py --config recipes/paper/prune-sweep.yaml --report

For every expert in the recipe, every saliency score and every keep fraction,
the expert is pruned with the library's own path (umtam.prune.write_pruned,
global scope: one threshold over all 2-D encoder weights, the rest reset to the
base) into a scratch directory and evaluated on dev with umtam.evaluate, exactly
as `umtam prune` then `umtam eval` would. Nothing is chosen here, so dev is the
only split scored. Each point's small JSON goes to bench/results/prune/<expert>/
and existing ones are skipped, so the sweep resumes. --report prints one table
per task and draws bench/results/prune_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path("bench/results/prune")
EXPERT_RESULTS = Path("bench/results/experts")
PLOT = Path("bench/results/prune_sweep.png")
def load_sweep(path: str | Path) -> dict:
    """The sweep recipe through umtam's loader: unknown keys, unknown scores and keeps outside (0, 1] refused."""
    from typing import Annotated, Literal

    from pydantic import Field

    from umtam.config import Schema, build_config, load_recipe, option, registered
    from umtam.scores import SCORES

    class PruneSweep(Schema):
        experts: list[str] = option(min_length=1, help="Expert run names under runs_dir.")
        scores: list[Annotated[str, registered(SCORES)]] = option(min_length=1, help="Saliency scores.")
        keeps: list[Annotated[float, Field(gt=0, le=1)]] = option(min_length=1, help="Fractions kept.")
        scope: Literal["global", "tensor"] = option("global", help="Threshold over all 2-D weights or per tensor.")
        runs_dir: str = option("runs/experts", help="Where the experts were written.")
        max_eval_samples: int = option(2000, ge=1, help="Dev rows scored per task.")

    return build_config(PruneSweep, load_recipe(path), source=str(path)).model_dump()


def point_path(expert: str, score: str, keep: float) -> Path:
    return RESULTS / expert / f"{score}-keep{keep:g}.json"


def prune_and_score(checkpoint_dir: Path, score: str, keep: float, sweep: dict, data_dir) -> dict:
    from umtam.checkpoint import load_checkpoint
    from umtam.evaluate import evaluate_checkpoint
    from umtam.prune import write_pruned

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        pruned, report = write_pruned(checkpoint_dir, Path(scratch) / "pruned", keep=keep, score=score,
                                      scope=sweep["scope"])
        prune_seconds = time.perf_counter() - started
        (task, result), = evaluate_checkpoint(load_checkpoint(pruned.path), task="glue", data_dir=data_dir,
                                              max_eval_samples=sweep["max_eval_samples"], seed=42).items()
    return {"expert": checkpoint_dir.name, "task": task, "score": score, "keep": keep, "scope": sweep["scope"],
            "kept_fraction": report.kept_fraction, "prune_seconds": prune_seconds,
            "dev": result["splits"], "dev_score": result["score"], "normalized": result["normalized"]}


def run(sweep: dict, data_dir) -> None:
    for expert in sweep["experts"]:
        checkpoint_dir = Path(sweep["runs_dir"]) / expert
        for score in sweep["scores"]:
            for keep in sweep["keeps"]:
                path = point_path(expert, score, float(keep))
                if path.exists():
                    continue
                row = prune_and_score(checkpoint_dir, score, float(keep), sweep, data_dir)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=1) + "\n")
                print(f"{expert} {score} keep {keep:g}: dev {100 * row['dev_score']:.2f} "
                      f"(kept {100 * row['kept_fraction']:.2f}%)", flush=True)


def load_points(sweep: dict) -> dict[str, list[dict]]:
    points = {}
    for expert in sweep["experts"]:
        rows = [json.loads(p.read_text()) for p in sorted((RESULTS / expert).glob("*.json"))]
        if rows:
            points[expert] = rows
    return points


def expert_dev_score(expert: str) -> float | None:
    path = EXPERT_RESULTS / f"{expert}.json"
    return json.loads(path.read_text())["dev_score"] if path.exists() else None


def report(sweep: dict) -> str:
    """One table per expert: dev score by keep, one column per saliency score, the unpruned expert on top."""
    sections = []
    for expert, rows in load_points(sweep).items():
        scores = [s for s in sweep["scores"] if any(r["score"] == s for r in rows)]
        by_point = {(r["score"], r["keep"]): r for r in rows}
        full = expert_dev_score(expert)
        lines = [f"**{expert}** (unpruned dev {100 * full:.2f})" if full is not None else f"**{expert}**", "",
                 "| keep | " + " | ".join(scores) + " | curvature - magnitude |",
                 "|---|" + "---|" * (len(scores) + 1)]
        for keep in sorted({r["keep"] for r in rows}):
            cells = [by_point.get((score, keep)) for score in scores]
            shown = [f"{100 * c['dev_score']:.2f}" if c else "-" for c in cells]
            gap = by_point.get(("curvature", keep)), by_point.get(("magnitude", keep))
            diff = f"{100 * (gap[0]['dev_score'] - gap[1]['dev_score']):+.2f}" if all(gap) else "-"
            lines.append(f"| {100 * keep:g}% | " + " | ".join(shown) + f" | {diff} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def plot(sweep: dict, out: Path = PLOT) -> Path | None:
    from umtam.errors import ConfigError
    from umtam.plots import agg_canvas

    try:
        canvas_class = agg_canvas()
    except ConfigError:  # no matplotlib: the tables alone
        return None
    from matplotlib.figure import Figure

    points = load_points(sweep)
    tasks = sorted({rows[0]["task"] for rows in points.values()})
    if not tasks:
        return None
    figure = Figure(figsize=(3.6 * len(tasks), 3.4), layout="tight")
    canvas_class(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for expert, rows in points.items():
            if rows[0]["task"] != task:
                continue
            trained_with = "UMTAM" if "-umtam" in expert else "AdamW"
            for score, colour in (("curvature", "tab:red"), ("magnitude", "tab:blue")):
                line = sorted((r["keep"], r["dev_score"]) for r in rows if r["score"] == score)
                if line:
                    axis.plot([100 * k for k, _ in line], [100 * v for _, v in line], marker="o", color=colour,
                              linestyle="-" if trained_with == "UMTAM" else "--", label=f"{score} ({trained_with})")
        axis.set_xscale("log")
        axis.set_title(task.upper())
        axis.set_xlabel("keep (%)")
    axes[0][0].set_ylabel("dev score")
    axes[0][-1].legend(fontsize=7)
    figure.savefig(out, dpi=110)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep recipe, e.g. recipes/paper/prune-sweep.yaml")
    parser.add_argument("--data-dir")
    parser.add_argument("--report", action="store_true", help="only print tables and draw the plot")
    args = parser.parse_args()
    sweep = load_sweep(args.config)
    if not args.report:
        run(sweep, args.data_dir)
    print(report(sweep))
    drawn = plot(sweep)
    if drawn:
        print(f"\nplot: {drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
