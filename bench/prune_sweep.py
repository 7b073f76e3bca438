"""Pruning sweep (the paper's section 4.2): curvature against magnitude saliency at several densities.

    python bench/prune_sweep.py --config recipes/paper/prune-sweep.yaml
    python bench/prune_sweep.py --config recipes/paper/prune-sweep.yaml --seeds 42,43,44 --report

For every expert in the recipe (named as bench/experts.py names it, without
model and seed: those come from --model and --seeds), every training seed,
every saliency score and every keep fraction,
the expert is pruned with the library's own path (umtam.prune.write_pruned,
global scope: one threshold over all 2-D encoder weights, the rest reset to the
base) into a scratch directory and evaluated on dev with umtam.evaluate, exactly
as `umtam prune` then `umtam eval` would (rows subsampled with the training
seed). A recipe with ``holdout: true`` (the saliency study) also scores the
experts' unseen holdout slice of train: --report then chooses the score on it
(``choose``) and shows every score on dev beside it. Each point's small
JSON goes to bench/results/prune/<model>-s<seed>-<expert>/ and existing ones
are skipped, so the sweep resumes. --report prints one table per expert, each
cell the mean (+- standard deviation) over the seeds asked for, refuses seeds
it has no points for, and draws bench/results/prune_sweep.png.
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
HOLDOUT = 0.1  # the experts' unseen slice of train (bench/experts.py)


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
        holdout: bool = option(False, help="Also score the holdout slice, on which a score is chosen.")
        plot: str = option(str(PLOT), help="Where --report draws dev score against keep.")
        study: str = option("", help="A subfolder of bench/results/prune/ for this recipe's points.")

    return build_config(PruneSweep, load_recipe(path), source=str(path)).model_dump()


def expert_run(expert: str, tag: str, seed: int) -> str:
    """The expert's run name in bench/experts.py's scheme: <model>-s<seed>-<expert>."""
    return f"{tag}-s{seed}-{expert}"


def point_dir(sweep: dict, run: str) -> Path:
    """bench/results/prune/[<study>/]<run>/: a study keeps its points apart from the main sweep's."""
    return RESULTS / sweep["study"] / run if sweep["study"] else RESULTS / run


def point_path(sweep: dict, run: str, score: str, keep: float) -> Path:
    return point_dir(sweep, run) / f"{score}-keep{keep:g}.json"


def prune_and_score(checkpoint_dir: Path, score: str, keep: float, seed: int, sweep: dict, data_dir) -> dict:
    from umtam.checkpoint import load_checkpoint
    from umtam.evaluate import evaluate_checkpoint
    from umtam.prune import write_pruned

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        pruned, report = write_pruned(checkpoint_dir, Path(scratch) / "pruned", keep=keep, score=score,
                                      scope=sweep["scope"])
        prune_seconds = time.perf_counter() - started
        checkpoint = load_checkpoint(pruned.path)
        common = dict(task="glue", data_dir=data_dir, max_eval_samples=sweep["max_eval_samples"], seed=seed)
        (task, result), = evaluate_checkpoint(checkpoint, **common).items()
        holdout = evaluate_checkpoint(checkpoint, holdout_fraction=HOLDOUT, **common)[task] if sweep["holdout"] else None
    return {"expert": checkpoint_dir.name, "seed": seed, "task": task, "score": score, "keep": keep,
            "scope": sweep["scope"],
            "kept_fraction": report.kept_fraction, "prune_seconds": prune_seconds,
            "dev": result["splits"], "dev_score": result["score"],
            **({"holdout": holdout["splits"], "holdout_score": holdout["score"]} if holdout else {})}


def run(sweep: dict, tag: str, seeds: tuple[int, ...], data_dir) -> None:
    for seed in seeds:
        for expert in sweep["experts"]:
            name = expert_run(expert, tag, seed)
            checkpoint_dir = Path(sweep["runs_dir"]) / name
            for score in sweep["scores"]:
                for keep in sweep["keeps"]:
                    path = point_path(sweep, name, score, float(keep))
                    if path.exists() and (not sweep["holdout"] or "holdout_score" in json.loads(path.read_text())):
                        continue
                    row = prune_and_score(checkpoint_dir, score, float(keep), seed, sweep, data_dir)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(row, indent=1) + "\n")
                    print(f"{name} {score} keep {keep:g}: dev {100 * row['dev_score']:.2f} "
                          f"(kept {100 * row['kept_fraction']:.2f}%)", flush=True)


def load_points(sweep: dict, tag: str, seeds: tuple[int, ...]) -> dict[str, dict[int, list[dict]]]:
    """expert -> seed -> its points; a seed asked for with no point at all is refused in one line."""
    points: dict[str, dict[int, list[dict]]] = {}
    for expert in sweep["experts"]:
        for seed in seeds:
            rows = [json.loads(p.read_text()) for p in sorted(point_dir(sweep, expert_run(expert, tag, seed)).glob("*.json"))]
            if rows:
                points.setdefault(expert, {})[seed] = rows
    found = {seed for by_seed in points.values() for seed in by_seed}
    missing = [seed for seed in seeds if seed not in found]
    if missing:
        raise SystemExit(f"prune_sweep.py: no points for model {tag!r} seed(s) {', '.join(map(str, missing))} under "
                         f"{RESULTS}; run the sweep for them first")
    return points


def expert_dev_score(run: str) -> float | None:
    path = EXPERT_RESULTS / f"{run}.json"
    return json.loads(path.read_text())["dev_score"] if path.exists() else None


def spread(values: list[float], *, signed: bool = False) -> str:
    """'83.28' for one value, '83.28 +- 0.41' (sample standard deviation) for several, in points."""
    import statistics

    if not values:
        return "-"
    mean = f"{100 * statistics.mean(values):{'+' if signed else ''}.2f}"
    return mean if len(values) == 1 else f"{mean} +- {100 * statistics.stdev(values):.2f}"


def report(sweep: dict, tag: str, seeds: tuple[int, ...]) -> str:
    """One table per expert: dev score by keep, one column per saliency score (mean +- std over the seeds)."""
    sections = []
    for expert, by_seed in load_points(sweep, tag, seeds).items():
        rows = [row for seed_rows in by_seed.values() for row in seed_rows]
        scores = [s for s in sweep["scores"] if any(r["score"] == s for r in rows)]
        point = by_cell(by_seed)
        full = [score for seed in by_seed if (score := expert_dev_score(expert_run(expert, tag, seed))) is not None]
        title = f"**{expert}** ({tag}, seed {', '.join(map(str, by_seed))}"
        lines = [title + (f"; unpruned dev {spread(full)})" if full else ")"), "",
                 "| keep | " + " | ".join(scores) + " | curvature - magnitude |",
                 "|---|" + "---|" * (len(scores) + 1)]
        for keep in sorted({r["keep"] for r in rows}):
            shown = [spread([point[(seed, score, keep)]["dev_score"] for seed in by_seed
                             if (seed, score, keep) in point]) for score in scores]
            gaps = [point[(seed, "curvature", keep)]["dev_score"] - point[(seed, "magnitude", keep)]["dev_score"]
                    for seed in by_seed if (seed, "curvature", keep) in point and (seed, "magnitude", keep) in point]
            lines.append(f"| {100 * keep:g}% | " + " | ".join(shown) + f" | {spread(gaps, signed=True)} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def by_cell(by_seed: dict[int, list[dict]]) -> dict[tuple[int, str, float], dict]:
    """(seed, score, keep) -> that point, for one expert's points."""
    return {(seed, row["score"], row["keep"]): row for seed, rows in by_seed.items() for row in rows}


def cell_means(sweep: dict, points: dict[str, dict[int, list[dict]]],
               split: str) -> dict[tuple[str, str, float], float]:
    """(expert, score, keep) -> the seed mean of the split's score, over the cells every seed has.

    Only the sweep's own scores and keeps count: studies may share a folder of points.
    """
    import statistics

    means = {}
    for expert, by_seed in points.items():
        values: dict[tuple[str, float], list[float]] = {}
        for seed_rows in by_seed.values():
            for row in seed_rows:
                if f"{split}_score" in row and row["score"] in sweep["scores"] and row["keep"] in sweep["keeps"]:
                    values.setdefault((row["score"], row["keep"]), []).append(row[f"{split}_score"])
        means.update({(expert, score, keep): statistics.mean(v) for (score, keep), v in values.items()
                      if len(v) == len(by_seed)})
    return means


def cell_gaps(sweep: dict, points: dict[str, dict[int, list[dict]]], score: str,
              split: str = "dev") -> list[list[float]]:
    """Per (expert, keep) cell: ``score`` minus magnitude on the split, paired by seed (cells every seed has)."""
    gaps = []
    for by_seed in points.values():
        point = by_cell(by_seed)
        for keep in sweep["keeps"]:
            pairs = [tuple(point.get((seed, name, keep), {}).get(f"{split}_score") for name in (score, "magnitude"))
                     for seed in by_seed]
            if all(a is not None and b is not None for a, b in pairs):
                gaps.append([a - b for a, b in pairs])
    return gaps


def beyond_spread(gaps: list[list[float]]) -> tuple[int, int]:
    """(cells ahead, cells behind) where the seed-mean gap exceeds its sample standard deviation.

    One seed has no spread, so nothing counts: the README calls a difference only where it exceeds the spread.
    """
    import statistics

    called = [mean for cell in gaps if len(cell) > 1 and abs(mean := statistics.mean(cell)) > statistics.stdev(cell)]
    return sum(mean > 0 for mean in called), sum(mean < 0 for mean in called)


def study(sweep: dict, tag: str, seeds: tuple[int, ...]) -> str:
    """Per score: cells at or above magnitude and mean score, on holdout (where it is chosen) and on dev.

    The score chosen is the one with the best mean holdout score over the
    cells (seed means); dev is only reported. The cell counts are the issue's
    measure against magnitude (magnitude's own row is trivially all cells).
    """
    import statistics

    lines = ["| score | holdout cells >= magnitude | holdout mean | dev cells >= magnitude | dev mean "
             "| dev cells ahead / behind beyond the spread |", "|---|---|---|---|---|---|"]
    summary = {}
    points = load_points(sweep, tag, seeds)
    for split in ("holdout", "dev"):
        means = cell_means(sweep, points, split)
        cells = sorted({(e, k) for e, s, k in means if s == "magnitude"})
        for score in sweep["scores"]:
            paired = [(means[(e, score, k)], means[(e, "magnitude", k)]) for e, k in cells if (e, score, k) in means]
            summary[(score, split)] = (sum(a >= b for a, b in paired), len(paired),
                                       statistics.mean(a for a, _ in paired) if paired else float("nan"))
    ranked = sorted(sweep["scores"], key=lambda s: summary[(s, "holdout")][2])
    for score in sweep["scores"]:
        held, dev = summary[(score, "holdout")], summary[(score, "dev")]
        mark = " (chosen on holdout)" if score == ranked[-1] else ""
        ahead, behind = beyond_spread(cell_gaps(sweep, points, score)) if score != "magnitude" else ("-", "-")
        lines.append(f"| {score}{mark} | {held[0]} of {held[1]} | {100 * held[2]:.2f} | {dev[0]} of {dev[1]} "
                     f"| {100 * dev[2]:.2f} | {ahead} / {behind} |")
    return "\n".join(lines)


def plot(sweep: dict, tag: str, seeds: tuple[int, ...]) -> Path | None:
    from umtam.errors import ConfigError
    from umtam.plots import agg_canvas

    try:
        canvas_class = agg_canvas()
    except ConfigError:  # no matplotlib: the tables alone
        return None
    from matplotlib.figure import Figure

    import statistics

    points = load_points(sweep, tag, seeds)
    first = {expert: next(iter(by_seed.values())) for expert, by_seed in points.items()}
    tasks = sorted({rows[0]["task"] for rows in first.values()})
    if not tasks:
        return None
    figure = Figure(figsize=(3.6 * len(tasks) + 2.6, 3.4), layout="tight")  # room for the legend outside
    canvas_class(figure)
    axes = figure.subplots(1, len(tasks), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for expert, by_seed in points.items():
            if first[expert][0]["task"] != task:
                continue
            trained_with = "UMTAM" if "-umtam" in expert else "AdamW"
            rows = [row for seed_rows in by_seed.values() for row in seed_rows]
            for score, colour in zip(sweep["scores"], COLOURS):
                keeps = sorted({r["keep"] for r in rows if r["score"] == score})
                line = [(keep, statistics.mean(r["dev_score"] for r in rows if (r["score"], r["keep"]) == (score, keep)))
                        for keep in keeps]
                if line:
                    axis.plot([100 * k for k, _ in line], [100 * v for _, v in line], marker="o", color=colour,
                              linestyle="-" if trained_with == "UMTAM" else "--", label=f"{score} ({trained_with})")
        axis.set_xscale("log")
        axis.set_title(task.upper())
        axis.set_xlabel("keep (%)")
    axes[0][0].set_ylabel("dev score")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    out = Path(sweep["plot"])
    figure.savefig(out, dpi=110)
    return out


COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep recipe, e.g. recipes/paper/prune-sweep.yaml")
    parser.add_argument("--model", help="the experts' model, as bench/experts.py --model [default: all-MiniLM-L6-v2]")
    parser.add_argument("--seeds", default="42", help="comma list of the experts' training seeds")
    parser.add_argument("--data-dir")
    parser.add_argument("--report", action="store_true", help="only print tables and draw the plot")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from experts import model_tag

    sweep, tag = load_sweep(args.config), model_tag(args.model)
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    if not args.report:
        run(sweep, tag, seeds, args.data_dir)
    print(report(sweep, tag, seeds))
    if sweep["holdout"]:
        print("\n" + study(sweep, tag, seeds))
    drawn = plot(sweep, tag, seeds)
    if drawn:
        print(f"\nplot: {drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
