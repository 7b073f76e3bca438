"""The paper's language-model claims, measured: validation loss across ranks and learning rates (issue 16).

    python bench/lm_grid.py --config recipes/paper/lm-grid.yaml --stage coarse   # lr sweep at one rank
    python bench/lm_grid.py --config recipes/paper/lm-grid.yaml --stage grid     # optimizers x ranks x 3 lrs
    python bench/lm_grid.py --config recipes/paper/lm-grid.yaml --stage seeds    # more seeds, middle cells
    python bench/lm_grid.py --config recipes/paper/lm-grid.yaml --report         # tables and plots only

A GPT-2-shaped model (the recipe's config.json) is trained from scratch with
``umtam train --task lm`` on the recipe's text, validated on its held-out
validation file every ``eval_every`` steps (token-weighted loss, padding
masked: --eval-every), with the same token stream and seed for every run of a
seed. Stage ``coarse`` sweeps ``coarse.lrs`` at ``coarse.rank`` for
``coarse.steps`` steps, then widens each optimizer's sweep by half-decade
steps while its best lr is the edge of those it tried (``widening_runs``);
from it each optimizer's three regimes are chosen by rule (``regimes``): the
middle is its best coarse lr, the low and high one tried lr either side, so
the high one is where an optimizer gets worse than its best (or fails). Stage ``grid`` trains every optimizer at every rank (AdamW once:
it has no rank) at its three lrs; ``seeds`` repeats the middle-regime cells at
``seed_ranks`` for ``seeds``. Every run's small JSON lands in
bench/results/lm_grid/<name>/ as it finishes, and existing ones are skipped,
so stages resume. A run whose loss or weights go NaN or inf is recorded as
diverged (with the step), not dropped; the report counts a run as failed when
it diverged or ended above ln(vocabulary), the uniform predictor's loss.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path("bench/results/lm_grid")


def load_sweep(path: str) -> dict:
    """The grid recipe through umtam's loader (unknown keys refused, optimizers checked against the registry)."""
    from typing import Annotated, Any

    from pydantic import Field

    from umtam.config import Schema, build_config, load_recipe, option, registered
    from umtam.optim.registry import OPTIMIZERS

    class LmGrid(Schema):
        name: str = option(help="Results subfolder under bench/results/lm_grid/.")
        model: str = option(help="Directory with the config.json trained from scratch.")
        tokenizer: str = option(help="Tokenizer directory (GPT-2's BPE).")
        data: str = option(help="Training text.")
        eval_data: str = option(help="Held-out validation text.")
        optimizers: list[Annotated[str, registered(OPTIMIZERS)]] = option(min_length=1, help="Optimizers.")
        ranks: list[Annotated[int, Field(ge=1)]] = option(min_length=1, help="Ranks of the low-rank optimizers.")
        steps: int = option(ge=1, help="Optimizer steps per grid run.")
        batch_size: int = option(8, ge=1, help="Sequences per step.")
        max_length: int = option(256, ge=8, help="Context (block) length in tokens.")
        eval_every: int = option(50, ge=1, help="Validate every N steps.")
        max_eval_samples: int = option(64, ge=1, help="Validation blocks scored (seeded).")
        warmup_ratio: float = option(0.05, ge=0, lt=1, help="Linear warmup fraction, then linear decay.")
        weight_decay: float = option(0.0, ge=0, help="Decoupled weight decay.")
        dtype: str = option("fp32", help="fp32 or bf16 autocast.")
        seed: int = option(0, ge=0, help="The seed of the grid.")
        coarse: dict[str, Any] = option(help="{lrs: [...], rank: R, steps: S}: the lr sweep regimes come from.")
        seeds: list[int] = option(default_factory=list, help="Seeds for the middle-regime cells.")
        seed_ranks: list[int] = option(default_factory=list, help="Ranks repeated over the seeds.")
        runs_dir: str = option("runs/lm_grid", help="Checkpoints (deleted after scoring unless --keep).")

    return build_config(LmGrid, load_recipe(path), source=str(path)).model_dump()


def has_rank(optimizer: str) -> bool:
    return optimizer != "adamw"


def run_name(optimizer: str, rank: int, lr: float, seed: int, steps: int) -> str:
    rank_part = f"-r{rank}" if has_rank(optimizer) else ""
    return f"{optimizer}{rank_part}-lr{lr:g}-s{seed}-{steps}steps"


def train_one(grid: dict, optimizer: str, rank: int, lr: float, seed: int, steps: int, keep: bool) -> dict:
    """One run from scratch; its validation curve, wall time, state bytes, or where it diverged."""
    import shutil

    from umtam.config import build_config
    from umtam.errors import DivergenceError
    from umtam.machine import machine_name
    from umtam.train import TrainConfig, train

    name = run_name(optimizer, rank, lr, seed, steps)
    output = Path(grid["runs_dir"]) / grid["name"] / name
    config = build_config(TrainConfig, {
        "task": "lm", "model": grid["model"], "tokenizer": grid["tokenizer"], "from_scratch": True,
        "data": grid["data"], "eval_data": grid["eval_data"], "optimizer": optimizer, "rank": rank, "lr": lr,
        "max_steps": steps, "epochs": 1000, "batch_size": grid["batch_size"], "max_length": grid["max_length"],
        "eval_every": grid["eval_every"], "max_eval_samples": grid["max_eval_samples"], "seed": seed,
        "warmup_ratio": grid["warmup_ratio"], "weight_decay": grid["weight_decay"], "dtype": grid["dtype"],
        "output": str(output), "force": True,
    }, source="lm_grid")
    row = {"name": name, "optimizer": optimizer, "rank": rank if has_rank(optimizer) else None, "lr": lr,
           "seed": seed, "steps": steps, "tokens": steps * grid["batch_size"] * grid["max_length"]}
    started = time.perf_counter()
    try:
        checkpoint = train(config)
        sidecar = checkpoint.sidecar.as_json()
        parameters = sum(math.prod(shape) for shape in checkpoint.tensor_shapes().values())
    except DivergenceError as exc:  # NaN/inf loss, gradient or weights: a result; any other error stops the grid
        return {**row, "diverged": True, "error": str(exc).splitlines()[0], "wall_seconds": time.perf_counter() - started}
    finally:
        if not keep:
            shutil.rmtree(output, ignore_errors=True)
    curve = [(point["step"], point["metrics"]["validation"]["loss"]) for point in sidecar["training"]["eval_curve"]]
    (record,) = sidecar["tasks"].values()
    return {**row, "diverged": False, "final_val_loss": record["metrics"]["validation"]["loss"],
            "final_val_perplexity": record["metrics"]["validation"]["perplexity"],
            "val_curve": curve, "train_loss_curve": sidecar["training"]["loss_curve"],
            "wall_seconds": time.perf_counter() - started, "seconds_per_step": sidecar["seconds_per_step"],
            "state_bytes": sidecar["optimizer"]["state_bytes"], "peak_rss_bytes": sidecar["peak_rss_bytes"],
            "peak_gpu_bytes": sidecar.get("peak_gpu_bytes"), "device": machine_name(), "parameters": parameters}


def run_all(grid: dict, runs: list[tuple[str, int, float, int, int]], keep: bool) -> None:
    out = RESULTS / grid["name"]
    out.mkdir(parents=True, exist_ok=True)
    todo = [(run, path) for run in runs if not (path := out / f"{run_name(*run)}.json").exists()]
    for number, ((optimizer, rank, lr, seed, steps), path) in enumerate(todo, 1):
        print(f"training {path.stem} ({number} of {len(todo)}; {len(runs) - len(todo)} already done)", flush=True)
        row = train_one(grid, optimizer, rank, lr, seed, steps, keep)
        path.write_text(json.dumps(row, indent=1) + "\n")
        shown = "diverged" if row["diverged"] else f"val loss {row['final_val_loss']:.4f}"
        print(f"{row['name']}: {shown} ({row['wall_seconds']:.0f} s)", flush=True)


def load_rows(grid: dict) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RESULTS / grid["name"]).glob("*.json"))]


# ----------------------------------------------------------------------------- stages


def coarse_runs(grid: dict) -> list[tuple]:
    coarse = grid["coarse"]
    return [(opt, coarse["rank"], float(lr), grid["seed"], coarse["steps"])
            for opt in grid["optimizers"] for lr in coarse["lrs"]]


def coarse_rows(grid: dict, rows: list[dict], optimizer: str) -> list[dict]:
    coarse = grid["coarse"]
    return [r for r in rows if r["optimizer"] == optimizer and r["steps"] == coarse["steps"]
            and r["rank"] in (None, coarse["rank"]) and r["seed"] == grid["seed"]]


def coarse_best(grid: dict, rows: list[dict], optimizer: str) -> tuple[list[float], float] | None:
    """(the lrs its coarse sweep tried, in order; the one with the least final loss), None if none finished."""
    swept = coarse_rows(grid, rows, optimizer)
    scored = {r["lr"]: r["final_val_loss"] for r in swept if not failed(r, grid)}
    return (sorted({r["lr"] for r in swept}), min(scored, key=scored.get)) if scored else None


def regimes(grid: dict, rows: list[dict]) -> dict[str, list[float]]:
    """optimizer -> [low, middle, high] lr from its coarse sweep: its best lr and the tried lr either side.

    Each optimizer's tried lrs are the recipe's plus those ``widening_runs``
    added. At an edge of them the regime stays inside (the best lr then is low
    or high itself), and the report says the grid should be widened.
    """
    chosen = {}
    for opt in grid["optimizers"]:
        if (found := coarse_best(grid, rows, opt)) is None:
            continue
        lrs, best_lr = found
        best = lrs.index(best_lr)
        if len(lrs) < 3:  # a probe, not a sweep: one regime
            chosen[opt] = [lrs[best]] * 3
            continue
        middle = min(max(best, 1), len(lrs) - 2)
        chosen[opt] = [lrs[middle - 1], lrs[middle], lrs[middle + 1]]
    return chosen


# The coarse ladder: half-decade steps (1e-6, 3e-6, 1e-5, ...) up to 1, past any rate these optimizers take.
LADDER = tuple(sorted(float(f"{m}e{e}") for e in range(-6, 0) for m in (1, 3))) + (1.0,)  # 3e-1, not 0.3000...04


def ladder_step(lr: float, up: bool) -> float | None:
    """The ladder's next rate above (or below) ``lr``, None past its end."""
    beyond = [r for r in LADDER if (r > lr * 1.01 if up else r < lr / 1.01)]
    return (min(beyond) if up else max(beyond)) if beyond else None


def widening_runs(grid: dict, rows: list[dict]) -> list[tuple]:
    """One coarse run further out for each optimizer whose best lr is the edge of those it tried.

    MoFaSGD, an SGD-like update, still improves where the Adam-like optimizers
    are past their best; a shared grid would cut its range off. Run until it
    returns nothing: no optimizer's best is then on its edge, or the ladder ends.
    """
    coarse = grid["coarse"]
    runs = []
    for opt in grid["optimizers"]:
        if (found := coarse_best(grid, rows, opt)) is None:
            continue
        lrs, best = found
        step = ladder_step(best, up=True) if best == lrs[-1] else ladder_step(best, up=False) if best == lrs[0] else None
        if step is not None:
            runs.append((opt, coarse["rank"], step, grid["seed"], coarse["steps"]))
    return runs


# The grid takes CPU hours and lands over sessions: the middle regime (the rank-invariance
# claim) first, then the high one (where the paper says the baselines fall apart), then the low.
GRID_ORDER = (1, 2, 0)


def grid_runs(grid: dict, chosen: dict[str, list[float]]) -> list[tuple]:
    runs = []
    for regime in GRID_ORDER:
        for opt, lrs in chosen.items():
            for rank in grid["ranks"] if has_rank(opt) else [grid["ranks"][0]]:
                runs.append((opt, rank, lrs[regime], grid["seed"], grid["steps"]))
    return runs


def seed_runs(grid: dict, chosen: dict[str, list[float]]) -> list[tuple]:
    runs = []
    for opt, lrs in chosen.items():
        for rank in grid["seed_ranks"] if has_rank(opt) else [grid["ranks"][0]]:
            runs += [(opt, rank, lrs[1], seed, grid["steps"]) for seed in grid["seeds"]]
    return runs


# ----------------------------------------------------------------------------- report


REGIMES = ("low", "middle", "high")


@functools.lru_cache(maxsize=None)
def uniform_loss(model: str) -> float:
    """ln(vocabulary): the loss of predicting every token equally likely, what an untrained model starts near."""
    return math.log(json.loads((Path(model) / "config.json").read_text())["vocab_size"])


def failed(row: dict, grid: dict) -> bool:
    """Diverged (NaN/inf stopped it), or ended above the uniform predictor's loss: it learned nothing."""
    return row["diverged"] or row["final_val_loss"] > uniform_loss(grid["model"])


def cells(grid: dict, rows: list[dict], chosen: dict[str, list[float]],
          seed: int | None = None) -> dict[tuple[str, str, int | None], list]:
    """(optimizer, regime, rank) -> the grid-length runs' final losses over seeds (inf where failed).

    ``seed``: that seed's runs only, so spreads compare runs of one seed.
    """
    out: dict[tuple[str, str, int | None], list] = {}
    for row in rows:
        lrs = chosen.get(row["optimizer"], [])
        if row["steps"] != grid["steps"] or row["lr"] not in lrs or seed not in (None, row["seed"]):
            continue
        regime = REGIMES[lrs.index(row["lr"])]
        loss = math.inf if failed(row, grid) else row["final_val_loss"]
        out.setdefault((row["optimizer"], regime, row["rank"]), []).append(loss)
    return out


def fmt(values: list[float]) -> str:
    if any(math.isinf(v) for v in values):
        return "failed" if len(values) == 1 else f"failed in {sum(math.isinf(v) for v in values)}/{len(values)}"
    mean = statistics.mean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} +- {statistics.stdev(values):.3f}"


def max_min(values: list[float]) -> str:
    """max - min of the finite values ("-" with fewer than two), the failed ones counted apart."""
    finite = [v for v in values if math.isfinite(v)]
    diverged = len(values) - len(finite)
    return (f"{max(finite) - min(finite):.3f}" if len(finite) > 1 else "-") + (f" ({diverged} failed)" if diverged else "")


def spread(values: list[float], expected: int) -> str:
    """max_min and, as a second cell, its share of the finite values' mean; marked as partial while
    fewer than ``expected`` runs have landed (a spread over some ranks is not the claim's)."""
    finite = [v for v in values if math.isfinite(v)]
    relative = f"{100 * (max(finite) - min(finite)) / statistics.mean(finite):.1f}%" if len(finite) > 1 else "-"
    return f"{max_min(values)}{partial(values, expected)} | {relative}"


def partial(values: list, expected: int) -> str:
    return f" ({len(values)} of {expected} so far)" if 1 < len(values) < expected else ""


def report(grid: dict) -> str:
    rows = load_rows(grid)
    chosen = regimes(grid, rows)
    table = cells(grid, rows, chosen)
    one_seed = cells(grid, rows, chosen, seed=grid["seed"])  # spreads compare runs of the same seed
    ranks = grid["ranks"]
    on_edge = {run[0] for run in widening_runs(grid, rows)}
    lines = [coarse_table(grid, rows), "", "lr regimes (from the coarse sweep):"]
    lines += [f"  {opt}: " + ", ".join(f"{r} {lr:g}" for r, lr in zip(REGIMES, lrs))
              + (" (best lr on the edge of those tried: widen)" if opt in on_edge else "")
              for opt, lrs in chosen.items()]
    lines += ["", "| optimizer | regime | lr | " + " | ".join(f"r={r}" for r in ranks)
              + f" | spread across ranks (max-min, seed {grid['seed']}) | relative |",
              "|---|---|---|" + "---|" * (len(ranks) + 2)]
    for opt, lrs in chosen.items():
        for regime, lr in zip(REGIMES, lrs):
            if has_rank(opt):
                shown = [fmt(v) if (v := table.get((opt, regime, r))) else "-" for r in ranks]
                seed_losses = [v[0] for r in ranks if (v := one_seed.get((opt, regime, r)))]
                lines.append(f"| {opt} | {regime} | {lr:g} | " + " | ".join(shown) + f" | {spread(seed_losses, len(ranks))} |")
            else:
                value = table.get((opt, regime, None))  # no rank: its one run is the reference at every rank
                lines.append(f"| {opt} | {regime} | {lr:g} | " + " | ".join([fmt(value) if value else "-"] * len(ranks))
                             + " | no rank | - |")
    lines += ["", lr_spread_table(grid, one_seed, chosen), "", seed_table(grid, rows, chosen, one_seed), "",
              cost_table(grid, rows)]
    return "\n".join(lines)


def seed_table(grid: dict, rows: list[dict], chosen: dict, one_seed: dict) -> str:
    """The middle regime at the seed ranks over every seed: the noise a difference across ranks or optimizers
    has to exceed. Each optimizer's loss minus UMTAM's is paired by seed (same token stream, same init)."""
    middle = {}  # (optimizer, rank) -> {seed: final loss, inf where failed}
    for row in rows:
        lrs = chosen.get(row["optimizer"], [])
        if row["steps"] == grid["steps"] and lrs and row["lr"] == lrs[1] and row["rank"] in (*grid["seed_ranks"], None):
            loss = math.inf if failed(row, grid) else row["final_val_loss"]
            middle.setdefault((row["optimizer"], row["rank"]), {})[row["seed"]] = loss
    lines = ["| optimizer | rank | lr | seeds | final loss | - umtam's (paired) | rank spread, seed "
             f"{grid['seed']} (max-min) |", "|---|---|---|---|---|---|---|"]
    for (opt, rank), losses in sorted(middle.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        if len(losses) < 2:
            continue
        seeds = sorted(losses)
        reference = middle.get(("umtam", rank or grid["seed_ranks"][0]), {})  # AdamW: against UMTAM's first
        paired = [losses[s] - reference[s] for s in seeds if s in reference]
        versus = "-" if opt == "umtam" or len(paired) < 2 else fmt(paired)
        per_rank = [v[0] for r in grid["ranks"] if (v := one_seed.get((opt, "middle", r)))] if rank else []
        lines.append(f"| {opt} | {rank or '-'} | {chosen[opt][1]:g} | {', '.join(map(str, seeds))} | "
                     f"{fmt([losses[s] for s in seeds])} | {versus} | {max_min(per_rank)} |")
    return "\n".join(lines)


def coarse_table(grid: dict, rows: list[dict]) -> str:
    """Final validation loss of each optimizer's coarse runs by lr (widened ones included), its best in bold."""
    coarse = grid["coarse"]
    swept = {opt: {r["lr"]: r for r in coarse_rows(grid, rows, opt)} for opt in grid["optimizers"]}
    lrs = sorted({lr for runs in swept.values() for lr in runs})
    lines = [f"coarse sweep: rank {coarse['rank']}, {coarse['steps']} steps, final validation loss",
             "", "| optimizer | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for opt, runs in swept.items():
        scored = {lr: r["final_val_loss"] for lr, r in runs.items() if not failed(r, grid)}
        best = min(scored, key=scored.get) if scored else None
        cells_ = ["-" if lr not in runs else "failed" if lr not in scored
                  else f"**{scored[lr]:.3f}**" if lr == best else f"{scored[lr]:.3f}" for lr in lrs]
        lines.append(f"| {opt} | " + " | ".join(cells_) + " |")
    return "\n".join(lines)


def lr_spread_table(grid: dict, table, chosen) -> str:
    """Per optimizer and rank: the spread of final loss across the three regimes (diverged counted apart),
    over ``table``'s runs (the report passes one seed's)."""
    ranks = grid["ranks"]
    lines = ["| optimizer | " + " | ".join(f"r={r} spread across lrs" for r in ranks) + " |",
             "|---|" + "---|" * len(ranks)]
    for opt in chosen:
        shown = []
        for rank in ranks if has_rank(opt) else [None]:
            losses = [statistics.mean(v) for regime in REGIMES if (v := table.get((opt, regime, rank)))]
            shown.append(max_min(losses) + partial(losses, len(REGIMES)))
        shown = shown if has_rank(opt) else shown * len(ranks)  # no rank: one spread, shown at every rank
        lines.append(f"| {opt} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def cost_table(grid: dict, rows: list[dict]) -> str:
    gpu = any(r.get("peak_gpu_bytes") for r in rows)  # a GPU run's peak memory is the figure that matters there
    lines = ["| optimizer | rank | runs | failed | s/step (mean) | optimizer + tracker state MB |"
             + (" peak GPU GB |" if gpu else ""), "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    keys = sorted({(r["optimizer"], r["rank"] or 0) for r in rows if r["steps"] == grid["steps"]})
    for opt, rank in keys:
        group = [r for r in rows if r["optimizer"] == opt and (r["rank"] or 0) == rank and r["steps"] == grid["steps"]]
        done = [r for r in group if not failed(r, grid)]
        step = statistics.mean(r["seconds_per_step"] for r in done) if done else float("nan")
        state = statistics.mean(r["state_bytes"] for r in done) / 1e6 if done else float("nan")
        peak = max((r.get("peak_gpu_bytes") or 0 for r in done), default=0) / 1e9
        lines.append(f"| {opt} | {rank or '-'} | {len(group)} | {len(group) - len(done)} | {step:.2f} | {state:.1f} |"
                     + (f" {peak:.2f} |" if gpu else ""))
    return "\n".join(lines)


def rank_series(one_seed: dict, every_seed: dict, opt: str, regime: str, ranks: list) -> tuple[list, list]:
    """One optimizer's points in one regime: the grid seed's (rank, loss) line, and each cell that has
    several seeds as (rank, mean, standard deviation), drawn beside the line rather than on it, so a
    several-seed mean never sits among single-seed points as if it were one of them. Failed runs are left
    out of both."""
    line = [(r, v[0]) for r in ranks if (v := one_seed.get((opt, regime, r))) and math.isfinite(v[0])]
    seeded = [(r, statistics.mean(v), statistics.stdev(v)) for r in ranks
              if len(v := every_seed.get((opt, regime, r), [])) > 1 and all(math.isfinite(x) for x in v)]
    return line, seeded


def plot(grid: dict) -> list[Path]:
    """Loss against rank, one panel per regime (the paper's Figure 5 shape): the grid seed's line per
    optimizer (AdamW, with no rank, a dashed level), and the cells run on more seeds as their mean and
    standard deviation beside it (AdamW's as a band); then the middle regime's curves."""
    from umtam.errors import ConfigError
    from umtam.plots import agg_canvas

    try:
        canvas_class = agg_canvas()
    except ConfigError:
        return []
    from matplotlib.figure import Figure

    rows = load_rows(grid)
    chosen = regimes(grid, rows)
    one_seed, every_seed = cells(grid, rows, chosen, seed=grid["seed"]), cells(grid, rows, chosen)
    figure = Figure(figsize=(12, 3.6), layout="tight")
    canvas_class(figure)
    axes = figure.subplots(1, 3, sharey=True)
    for axis, regime in zip(axes, REGIMES):
        for number, opt in enumerate(chosen):
            ranked = has_rank(opt)
            line, seeded = rank_series(one_seed, every_seed, opt, regime, grid["ranks"] if ranked else [None])
            if not ranked:
                for _, loss in line:
                    axis.axhline(loss, color="gray", linestyle="--", label=f"{opt} (no rank), seed {grid['seed']}")
                for _, mean, sd in seeded:
                    axis.axhspan(mean - sd, mean + sd, color="gray", alpha=0.15, label=f"{opt}, seeds' mean +- sd")
                continue
            drawn = axis.plot([r for r, _ in line], [v for _, v in line], marker="o",
                              label=f"{opt}, seed {grid['seed']}") if line else []
            if seeded:  # right of the line's point at that rank, each optimizer a step further, in its colour
                colour = drawn[0].get_color() if drawn else None
                axis.errorbar([r * 1.07 ** (number + 1) for r, _, _ in seeded], [m for _, m, _ in seeded],
                              yerr=[sd for _, _, sd in seeded], fmt="s", mfc="none", color=colour, capsize=3,
                              label=f"{opt}, seeds' mean +- sd")
        axis.set_xscale("log", base=2)
        axis.set_title(f"{regime} lr")
        axis.set_xlabel("rank")
    axes[0].set_ylabel("final validation loss")
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
        axis.set_xticks(grid["ranks"], [str(r) for r in grid["ranks"]])  # the grid's ranks, drawn or not yet
        axis.set_xlim(grid["ranks"][0] / 1.4, grid["ranks"][-1] * 1.4)
    out = RESULTS / grid["name"] / "loss_vs_rank.png"
    figure.savefig(out, dpi=110)
    return [out, plot_middle_curves(grid, rows, chosen, canvas_class)]


# One colour map per optimizer, darker for a higher rank, so 16 curves stay readable.
CURVE_COLOURS = {"umtam": "Blues", "mofasgd": "Oranges", "galore": "Greens"}


def plot_middle_curves(grid: dict, rows: list[dict], chosen: dict, canvas_class) -> Path:
    """Validation loss against step of every middle-regime run of the grid's seed."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2), layout="tight")
    canvas_class(figure)
    axis = figure.subplots()
    ranks = grid["ranks"]
    for row in sorted(rows, key=lambda r: (r["optimizer"], r["rank"] or 0)):
        lrs = chosen.get(row["optimizer"], [])
        if failed(row, grid) or row["steps"] != grid["steps"] or not lrs or row["lr"] != lrs[1] or row["seed"] != grid["seed"]:
            continue
        steps, losses = zip(*row["val_curve"])
        if row["rank"] and row["optimizer"] in CURVE_COLOURS:
            shade = 0.35 + 0.65 * ranks.index(row["rank"]) / max(1, len(ranks) - 1) if row["rank"] in ranks else 1.0
            colour, style = colormaps[CURVE_COLOURS[row["optimizer"]]](shade), "-"
        else:
            colour, style = "black", "--"
        axis.plot(steps, losses, color=colour, linestyle=style,
                  label=f"{row['optimizer']}" + (f" r={row['rank']}" if row["rank"] else ""))
    axis.set_xlabel("step")
    axis.set_ylabel("validation loss")
    axis.set_title("middle lr regime (darker: higher rank)")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=6, ncol=2)
    curves = RESULTS / grid["name"] / "middle_curves.png"
    figure.savefig(curves, dpi=110)
    return curves


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="grid recipe, e.g. recipes/paper/lm-grid.yaml")
    parser.add_argument("--stage", choices=("coarse", "grid", "seeds"), help="which runs to train")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints under runs_dir")
    parser.add_argument("--report", action="store_true", help="only print the tables and draw the plots")
    args = parser.parse_args()
    grid = load_sweep(args.config)
    if args.stage and not args.report:
        rows = load_rows(grid)
        runs = {"coarse": lambda: coarse_runs(grid), "grid": lambda: grid_runs(grid, regimes(grid, rows)),
                "seeds": lambda: seed_runs(grid, regimes(grid, rows))}[args.stage]()
        run_all(grid, runs, args.keep)
        while args.stage == "coarse" and (runs := widening_runs(grid, load_rows(grid))):
            run_all(grid, runs, args.keep)
    print(report(grid))
    for path in plot(grid):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
