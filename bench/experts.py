"""Train the expert grid once and reuse it everywhere: LR sweep, optimizer quality, rank study, seeds.

    python bench/experts.py                                   # mrpc, rte, cola x adamw, umtam x 3 lrs
    python bench/experts.py --tasks rte,mrpc,cola,sst2,stsb   # issue 5's five experts
    python bench/experts.py --tasks mrpc --optimizers umtam --ranks 4,16,32 --lrs umtam=2e-4
    python bench/experts.py --seeds 43,44 --chosen-lrs        # more seeds at each seed-42 holdout choice
    python bench/experts.py --report                          # tables + PNGs from bench/results only

Every run is recipes/paper/expert-<task>-<optimizer>.yaml with the swept lr and
rank put over it: the default model (or --model) for 3 epochs (batch 32, max
length 128) on the task's training split minus a fixed 10% holdout slice
(umtam.data.HOLDOUT_SEED). Results are named by model, seed, task, optimizer,
rank and lr (``minilm-s42-mrpc-umtam-r8-lr0.0001``), and the tables show the
given --model and --seeds only: asking for a seed or model with no results is
refused, never answered with another's. The learning rate of each (task,
optimizer) is chosen by the holdout score of seed 42 (``SELECTION_SEED``),
never by dev; other seeds rerun that choice (--chosen-lrs), and the tables
report mean and standard deviation over the seeds. The
holdout rows stay unseen by every expert, so prune and merge settings can be
chosen on them later (bench/sweep.py). SST-2's train is subsampled to 8,000
rows (seeded) and every eval set is capped at 2,000 rows (only SST-2's holdout
is that large). Runs whose result JSON exists are skipped, so the grid resumes;
with --rebuild-missing, a run whose JSON exists but whose checkpoint is gone
(a new machine) is trained again, for the sweeps that read the checkpoints.
Checkpoints go under --runs-dir (never committed); small JSON results under
bench/results/experts/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path("bench/results/experts")
SELECTION_SEED = 42  # the seed whose holdout scores choose each (task, optimizer)'s learning rate
DEFAULT_MODEL_TAG = "minilm"  # what the default model (all-MiniLM-L6-v2) is called in run names
TASK_ORDER = ["rte", "mrpc", "cola", "sst2", "stsb"]  # the order of every table
DEFAULT_LRS = {"adamw": [2e-5, 5e-5, 1e-4], "umtam": [1e-4, 2e-4, 5e-4]}
RECIPES = Path("recipes/paper")  # expert-<task>-<optimizer>.yaml: epochs, caps, holdout slice
EVAL_CAP = 2000  # the recipes' max_eval_samples: dev rows an expert is scored on


VARIANTS = {"error_feedback": "ef", "dense_embeddings": "de"}  # umtam options a run may add, and their name tags


def model_tag(model: str | None) -> str:
    """A short name for the model in run names: 'minilm' for the default, else the directory or repo name."""
    from umtam.models import DEFAULT_MODEL

    if model in (None, DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"):
        return DEFAULT_MODEL_TAG
    return "".join(c if c.isalnum() or c in "-." else "-" for c in Path(model.rstrip("/")).name.lower())


def load_profile(path: str | None) -> dict | None:
    """--profile FILE: {name, train: {TrainConfig fields}} laid over every expert recipe for one model
    (a 135M decoder on 2 CPU cores: bf16, one epoch, fewer rows). Its name joins the model's tag, so a
    profile's runs are chosen, reported and merged apart from the recipes' own."""
    if path is None:
        return None
    from umtam.config.schema import parse_yaml

    profile = parse_yaml(Path(path).read_text(), str(path))
    if not (isinstance(profile, dict) and isinstance(profile.get("name"), str) and isinstance(profile.get("train"), dict)
            and set(profile) <= {"name", "train"}):
        raise SystemExit(f"experts.py: {path}: a profile is {{name: str, train: {{option: value}}}}")
    return profile


def tag_of(model: str | None, profile: dict | None) -> str:
    """The model's tag, with the profile's name when one is given: 'smollm2-135m-instruct+cpu1k'."""
    return model_tag(model) + (f"+{profile['name']}" if profile else "")


def named_subset(entries: dict, names: str | None, option: str, where: str = "the recipe") -> dict:
    """The ``entries`` named in the comma list ``names`` (all when None), in their own order: how a
    driver's process takes its share of a recipe. A name not in ``entries`` is refused in one line."""
    if names is None:
        return entries
    wanted = names.split(",")
    if unknown := [name for name in wanted if name not in entries]:
        raise SystemExit(f"{option} {','.join(unknown)}: not in {where} ({', '.join(entries)})")
    return {name: spec for name, spec in entries.items() if name in wanted}


def eval_cap(profile: dict | None) -> int:
    """The dev rows an expert is scored on: the recipes' cap, or the profile's."""
    return (profile or {}).get("train", {}).get("max_eval_samples", EVAL_CAP)


def run_name(task: str, optimizer: str, rank: int, lr: float, variants: tuple[str, ...] = (), *,
             model: str = DEFAULT_MODEL_TAG, seed: int = SELECTION_SEED, settings: dict | None = None) -> str:
    rank_part = f"-r{rank}" if optimizer in ("umtam", "galore", "mofasgd") else ""
    variant_part = "".join(f"-{VARIANTS[v]}" for v in variants)
    variant_part += "".join(f"-{key}{value:g}" if isinstance(value, float) else f"-{key}{value}"
                            for key, value in sorted((settings or {}).items()))
    return f"{model}-s{seed}-{task}-{optimizer}{rank_part}{variant_part}-lr{lr:g}"


def variants_of(args) -> tuple[str, ...]:
    return tuple(v for v in VARIANTS if getattr(args, v, False))


def settings_of(args) -> dict:
    """--set KEY=VALUE: training options laid over the recipe (a variant: named in the run, never chosen)."""
    from umtam.config.schema import parse_yaml

    pairs = [entry.partition("=") for entry in getattr(args, "set", None) or []]
    return {key.strip(): parse_yaml(value, f"--set {key.strip()}") for key, _, value in pairs}


def recipe_path(task: str, optimizer: str) -> Path:
    return RECIPES / f"expert-{task}-{optimizer}.yaml"


def train_one(task, optimizer, rank, lr, seed, args) -> dict:
    import torch

    from umtam.config import build_config, load_recipe
    from umtam.evaluate import task_score
    from umtam.machine import machine_name
    from umtam.train import TrainConfig, train

    # The recipe is the single source of the run's settings; the sweep overrides lr, rank, seed and model.
    profile, settings = load_profile(args.profile), settings_of(args)
    name = run_name(task, optimizer, rank, lr, variants_of(args), model=tag_of(args.model, profile), seed=seed,
                    settings=settings)
    recipe = recipe_path(task, optimizer)
    overrides = {**(profile["train"] if profile else {}),
                 "output": str(Path(args.runs_dir) / name), "rank": rank, "lr": lr, "seed": seed,
                 "data_dir": args.data_dir, "force": True, **{v: True for v in variants_of(args)},
                 **settings,
                 **({"track_fisher": True, "track_trajectory": True} if args.track_saliency else {}),
                 **({"model": args.model} if args.model else {})}
    config = build_config(TrainConfig, load_recipe(recipe), overrides, source=str(recipe))
    started = time.perf_counter()
    sidecar = train(config).sidecar.as_json()
    record = sidecar["tasks"][task]
    curve = sidecar["training"]["loss_curve"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "name": name, "model": config.model, "model_tag": tag_of(args.model, profile),
        **({"profile": profile} if profile else {}),
        "task": task, "optimizer": optimizer, "rank": rank, "lr": lr, "seed": seed,
        **{v: True for v in variants_of(args)}, **({"settings": settings} if settings else {}),
        "checkpoint": config.output, "steps": sidecar["steps"], "wall_seconds": time.perf_counter() - started,
        "seconds_per_step": sidecar["seconds_per_step"], "state_bytes": sidecar["optimizer"]["state_bytes"],
        "dev": record["metrics"], "dev_score": task_score(task, record["metrics"]),
        "holdout": record["holdout_metrics"], "holdout_score": task_score(task, {"holdout": record["holdout_metrics"]}),
        "loss_curve": curve, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": machine_name(),
    }


def run_and_record(task, optimizer, rank, lr, seed, args) -> None:
    name = run_name(task, optimizer, rank, lr, variants_of(args), model=tag_of(args.model, load_profile(args.profile)),
                    seed=seed,
                    settings=settings_of(args))
    path = RESULTS / f"{name}.json"
    checkpoint_written = has_checkpoint(Path(args.runs_dir) / name, dense=args.track_saliency)
    # the committed JSON is the result; the checkpoint (never committed) is rebuilt only when
    # asked, e.g. on a new machine before the prune and merge sweeps, which read it
    if path.exists() and (checkpoint_written or not args.rebuild_missing):
        return
    print(f"training {name}" + (" (its checkpoint is gone: rebuilding)" if path.exists() else ""), flush=True)
    row = train_one(task, optimizer, rank, lr, seed, args)
    path.write_text(json.dumps(row, indent=1) + "\n")
    print(f"{row['name']}: holdout {row['holdout_score']:.4f} dev {row['dev_score']:.4f} "
          f"({row['wall_seconds']:.0f} s)", flush=True)


def has_checkpoint(directory: Path, *, dense: bool) -> bool:
    """Whether the run's checkpoint is there (and, with ``dense``, recorded the opt-in saliency statistics)."""
    sidecar = directory / "umtam.json"
    if not sidecar.is_file():
        return False
    return not dense or json.loads(sidecar.read_text())["training"]["config"].get("track_trajectory", False)


def parse_lrs(text: str | None) -> dict[str, list[float]]:
    grid = {key: list(values) for key, values in DEFAULT_LRS.items()}
    for part in (text or "").split(";"):
        if part.strip():
            optimizer, _, values = part.partition("=")
            grid[optimizer.strip()] = [float(v) for v in values.split(",")]
    return grid


def load_results(model: str = DEFAULT_MODEL_TAG, seeds: tuple[int, ...] | None = None) -> list[dict]:
    """The committed results of ``model`` (its tag) and ``seeds`` (all seeds when None), and nothing else."""
    rows = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json"))]
    return [row for row in rows if row["model_tag"] == model and (seeds is None or row["seed"] in seeds)]


def check_results_exist(rows: list[dict], model: str, seeds: tuple[int, ...]) -> None:
    """One line, exit 1, when a seed asked for has no results: another seed's tables are not this run's."""
    found = {row["seed"] for row in rows}
    missing = [seed for seed in seeds if seed not in found]
    if missing:
        everything = load_results(model)
        have = sorted({row["seed"] for row in everything})
        raise SystemExit(f"experts.py: no results for model {model!r} seed(s) {', '.join(map(str, missing))} under "
                         f"{RESULTS} (it has seed(s) {', '.join(map(str, have)) or 'none'} for that model); "
                         "train them first")


def chosen(results: list[dict], rank: int = 8) -> dict[tuple[str, str], dict]:
    """Best run per (task, optimizer) at ``rank`` by the selection seed's holdout score (ties: lower lr).

    Variant runs (error feedback, dense embeddings) are not candidates: their
    dense state is what the low-rank optimizer exists to avoid.
    """
    best: dict[tuple[str, str], dict] = {}
    for row in sorted(results, key=lambda r: r["lr"]):
        if not is_candidate(row, rank) or row["seed"] != SELECTION_SEED:
            continue
        key = (row["task"], row["optimizer"])
        if key not in best or row["holdout_score"] > best[key]["holdout_score"]:
            best[key] = row
    return best


def is_variant(row: dict) -> bool:
    return any(row.get(v) for v in VARIANTS) or bool(row.get("settings"))


def is_candidate(row: dict, rank: int = 8) -> bool:
    """A run the lr choice may pick: not a variant, and at ``rank`` if the optimizer has one."""
    return not is_variant(row) and (row["optimizer"] not in ("umtam", "galore", "mofasgd") or row["rank"] == rank)


def dev_cells(row: dict) -> str:
    """The dev metrics of a run, in points: '86.16 / 80.39'."""
    return " / ".join(f"{100 * v:.2f}" for v in row["dev"]["validation"].values())


def dev_baselines(task: str, data_dir: str | None, cap: int = EVAL_CAP) -> str:
    """'chance / majority' on the task's dev rows (as the experts were scored: capped at ``cap``), in points."""
    from umtam import metrics
    from umtam.errors import UmtamError
    from umtam.evaluate import scored_rows

    try:
        rows = scored_rows(task, data_dir=data_dir, max_eval_samples=cap, seed=SELECTION_SEED)
    except UmtamError as exc:  # no data here: the table still prints, saying why the column is empty
        return f"- ({type(exc).__name__})"
    labels = [e.label for split in rows.values() for e in split]
    return f"{100 * metrics.chance_score(task, labels):.2f} / {100 * metrics.majority_score(task, labels):.2f}"


def quality_table(results: list[dict], seeds: tuple[int, ...] = (SELECTION_SEED,), data_dir: str | None = None,
                  cap: int = EVAL_CAP) -> str:
    """Per task, the seed-42 holdout choice of each optimizer, its dev score as mean +- std over ``seeds``.

    Beside them, the dev score of guessing uniformly (chance) and of the best
    constant prediction (majority class), so a weak expert shows as one.
    """
    best = chosen(results)
    results = [row for row in results if row["seed"] in seeds]
    tasks = sorted({task for task, _ in best}, key=TASK_ORDER.index)
    lines = ["| task | metric | chance / majority (dev) | AdamW lr (holdout) | AdamW dev | UMTAM r=8 lr (holdout) "
             "| UMTAM dev | UMTAM - AdamW | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        adamw, umtam = best.get((task, "adamw")), best.get((task, "umtam"))
        adamw_runs, umtam_runs = (same_setting(results, row) if row else [] for row in (adamw, umtam))
        paired = sorted({r["seed"] for r in adamw_runs} & {r["seed"] for r in umtam_runs})
        gaps = [by_seed(umtam_runs)[seed]["dev_score"] - by_seed(adamw_runs)[seed]["dev_score"] for seed in paired]
        shown = sorted({r["seed"] for r in adamw_runs + umtam_runs}) if not paired else paired
        metric = " / ".join((adamw or umtam)["dev"]["validation"])
        lines.append(f"| {task} | {metric} | {dev_baselines(task, data_dir, cap)} | {choice_cells(adamw, adamw_runs)} "
                     f"| {choice_cells(umtam, umtam_runs)} | {spread(gaps, signed=True)} "
                     f"| {', '.join(map(str, shown))} |")
    return "\n".join(lines)


def choice_cells(row: dict | None, runs: list[dict]) -> str:
    """'lr (holdout) | dev mean +- std' of one optimizer's choice; dashes where it has not been trained."""
    if row is None:
        return "- | -"
    return f"{short_lr(row['lr'])} ({100 * row['holdout_score']:.2f}) | {spread([r['dev_score'] for r in runs])}"


def same_setting(results: list[dict], row: dict) -> list[dict]:
    """Every seed's run of the same task, optimizer, rank and lr as ``row`` (not variants)."""
    return [r for r in results if not is_variant(r)
            and (r["task"], r["optimizer"], r["rank"], r["lr"]) == (row["task"], row["optimizer"], row["rank"], row["lr"])]


def by_seed(rows: list[dict]) -> dict[int, dict]:
    return {row["seed"]: row for row in rows}


def spread(values: list[float], *, signed: bool = False) -> str:
    """'83.28' for one seed, '83.28 +- 0.41' (sample standard deviation) for several, in points."""
    import statistics

    if not values:
        return "-"
    mean = f"{100 * statistics.mean(values):{'+' if signed else ''}.2f}"
    return mean if len(values) == 1 else f"{mean} +- {100 * statistics.stdev(values):.2f}"


def short_lr(lr: float) -> str:
    """1e-4, 5e-5, 2e-4: the way the sweep is written, not 0.0001."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if float(f"{lr:.0e}") == lr else f"{lr:g}"


def lr_grid_table(results: list[dict]) -> str:
    """The selection seed's learning-rate sweep: holdout / dev score per task and (optimizer, lr); bold = chosen."""
    best = chosen(results)
    candidates = [r for r in results if r["optimizer"] in ("adamw", "umtam") and is_candidate(r)
                  and r["seed"] == SELECTION_SEED]
    columns = sorted({(r["optimizer"], r["lr"]) for r in candidates})
    tasks = sorted({r["task"] for r in candidates}, key=TASK_ORDER.index)
    label = {"adamw": "AdamW", "umtam": "UMTAM r=8"}
    lines = ["| task | " + " | ".join(f"{label[o]} {short_lr(lr)}" for o, lr in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for task in tasks:
        cells = []
        for optimizer, lr in columns:
            row = next((r for r in candidates if (r["task"], r["optimizer"], r["lr"]) == (task, optimizer, lr)), None)
            text = "-" if row is None else f"{100 * row['holdout_score']:.2f} / {100 * row['dev_score']:.2f}"
            cells.append(f"**{text}**" if row is not None and best.get((task, optimizer)) is row else text)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    lines = ["| run | steps | s/step | holdout score | dev score |", "|---|---|---|---|---|"]
    for row in sorted(results, key=lambda r: (r["task"], r["optimizer"], r["rank"], r["lr"], r["seed"])):
        lines.append(f"| {row['name']} | {row['steps']} | {row['seconds_per_step']:.3f} | "
                     f"{100 * row['holdout_score']:.2f} | {100 * row['dev_score']:.2f} |")
    return "\n".join(lines)


def variant_label(row: dict) -> str:
    """What a run changes from the plain expert (UMTAM's: r=8): its rank, switches and --set options."""
    ranked = row["optimizer"] == "umtam" and row["rank"] != 8
    parts = ([f"r={row['rank']}"] if ranked else []) + [v.replace("_", "-") for v in VARIANTS if row.get(v)]
    parts += [f"{key}={value}" for key, value in sorted(row.get("settings", {}).items())]
    return ", ".join(parts) or "plain r=8"


TAIL_STEPS = 120  # the training loss a variants row reports: the mean of its last steps (one step is noise)


def tail_loss(row: dict) -> float:
    return statistics.mean(row["loss_curve"][-TAIL_STEPS:])


def loss_spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def variants_table(results: list[dict], seeds: tuple[int, ...]) -> str:
    """Per task with variants: AdamW and the plain UMTAM expert at their chosen lrs, then each UMTAM variant
    at the plain one's lr; optimizer state, final training loss, holdout and dev mean +- std over the seeds
    each has (issue 15 item 5's layout): whether a variant fits the training set better, and whether that
    carries to held-out rows."""
    best = chosen(results)
    lines = [f"| task | run | lr | state MiB | train loss (last {TAIL_STEPS} steps) | holdout | dev | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for task in TASK_ORDER:
        plain = best.get((task, "umtam"))
        runs = [r for r in results if r["task"] == task and r["optimizer"] == "umtam" and r["seed"] in seeds
                and plain is not None and r["lr"] == plain["lr"]]
        if not any(is_variant(r) or r["rank"] != 8 for r in runs):
            continue
        groups: dict[str, list[dict]] = {}
        adamw = best.get((task, "adamw"))
        if adamw is not None:  # the plain AdamW expert, then AdamW under the same variant (is it UMTAM's alone?)
            for row in sorted((r for r in results if r["task"] == task and r["optimizer"] == "adamw"
                               and r["lr"] == adamw["lr"] and r["seed"] in seeds), key=is_variant):
                groups.setdefault(f"AdamW, {variant_label(row)}" if is_variant(row) else "AdamW", []).append(row)
        # the plain expert first, then by rank as a number (r=64 before r=384), then by name
        for row in sorted(runs, key=lambda r: (variant_label(r) != "plain r=8", r["rank"], variant_label(r))):
            groups.setdefault(variant_label(row), []).append(row)
        for label, rows in groups.items():
            lines.append(f"| {task} | {label} | {short_lr(rows[0]['lr'])} | {rows[0]['state_bytes'] / 2**20:.2f} | "
                         f"{loss_spread([tail_loss(r) for r in rows])} | {spread([r['holdout_score'] for r in rows])} "
                         f"| {spread([r['dev_score'] for r in rows])} | {', '.join(str(r['seed']) for r in rows)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def rank_table_and_plot(results: list[dict], task: str = "mrpc", out: Path = Path("bench/results/rank_sweep.png")):
    """Every learning rate the rank study ran at (two ranks or more) as one table; the PNG at one of them."""
    runs = [r for r in results if r["task"] == task and r["optimizer"] == "umtam" and not is_variant(r)
            and r["seed"] == SELECTION_SEED]
    studied = {lr: sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["rank"]) for lr in {r["lr"] for r in runs}}
    studied = {lr: rows for lr, rows in sorted(studied.items()) if len(rows) >= 2}
    if not studied:
        return ""
    first = next(iter(studied.values()))[0]
    lines = [f"| rank | lr | holdout score | dev {' / '.join(first['dev']['validation'])} | dev score | final loss |",
             "|---|---|---|---|---|---|"]
    for lr, rows in studied.items():
        for row in rows:
            final = sum(row["loss_curve"][-10:]) / len(row["loss_curve"][-10:])
            lines.append(f"| {row['rank']} | {lr:g} | {100 * row['holdout_score']:.2f} | {dev_cells(row)} "
                         f"| {100 * row['dev_score']:.2f} | {final:.4f} |")
    # The picture: the lr with the most ranks, the r=8 holdout choice on a tie.
    best = chosen(results)
    chosen_lr = best.get((task, "umtam"), {}).get("lr")
    plot_lr = max(studied, key=lambda lr: (len(studied[lr]), lr == chosen_lr))
    _rank_plot(studied[plot_lr], plot_lr, best.get((task, "adamw")), task, out)
    return "\n".join(lines)


def _rank_plot(rows: list[dict], lr: float, adamw: dict | None, task: str, out: Path) -> None:
    from umtam.errors import ConfigError
    from umtam.plots import loss_curves_png

    curves = {f"r={row['rank']}": row["loss_curve"] for row in rows}
    styles = {}
    if adamw:
        curves[f"AdamW lr={adamw['lr']:g}"] = adamw["loss_curve"]
        styles[f"AdamW lr={adamw['lr']:g}"] = {"color": "black", "linestyle": "--"}
    try:
        out.write_bytes(loss_curves_png(curves, title=f"UMTAM rank sweep on {task.upper()} (lr {lr:g})",
                                        styles=styles))
    except ConfigError:  # no matplotlib: the table alone
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="mrpc,rte,cola")
    parser.add_argument("--optimizers", default="adamw,umtam")
    parser.add_argument("--ranks", default="8", help="ranks for low-rank optimizers")
    parser.add_argument("--lrs", help="override grids, e.g. 'umtam=2e-4;adamw=5e-5'")
    parser.add_argument("--seeds", default=str(SELECTION_SEED), help="comma list of training seeds")
    parser.add_argument("--model", help="a Hugging Face model id or directory [default: all-MiniLM-L6-v2]")
    parser.add_argument("--chosen-lrs", action="store_true",
                        help=f"train only the lr seed {SELECTION_SEED}'s holdout chose for each (task, optimizer)")
    parser.add_argument("--runs-dir", default="runs/experts")
    parser.add_argument("--data-dir")
    parser.add_argument("--rank-study", metavar="TASK",
                        help="after the grid, train umtam at ranks 4,16,32 on TASK at its chosen r=8 lr")
    parser.add_argument("--error-feedback", action="store_true",
                        help="train umtam with its dense error-feedback buffer (runs named -ef; never chosen)")
    parser.add_argument("--dense-embeddings", action="store_true",
                        help="train umtam with dense AdamW state for the embeddings (runs named -de; never chosen)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="a training option over the recipe, e.g. warmup_ratio=0 or beta1=0.8 (runs named "
                             "-warmup_ratio0; never chosen); repeatable")
    parser.add_argument("--track-saliency", action="store_true",
                        help="train with --track-fisher --track-trajectory (same weights, more statistics); with "
                             "--rebuild-missing, retrains a run whose checkpoint lacks them")
    parser.add_argument("--profile", metavar="FILE",
                        help="training options over every recipe for this model, e.g. "
                             "recipes/paper/profile-decoder-cpu.yaml; its name joins the model's tag")
    parser.add_argument("--report", action="store_true", help="only print tables from existing results")
    parser.add_argument("--rebuild-missing", action="store_true",
                        help="retrain runs whose result JSON exists but whose checkpoint is missing")
    args = parser.parse_args()
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    profile = load_profile(args.profile)
    tag = tag_of(args.model, profile)

    RESULTS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        grid = parse_lrs(args.lrs)
        for seed in seeds:
            for task in args.tasks.split(","):
                for optimizer in args.optimizers.split(","):
                    ranks = [int(r) for r in args.ranks.split(",")] if optimizer != "adamw" else [8]
                    for rank in ranks:
                        for lr in lrs_to_train(task, optimizer, grid, tag, args.chosen_lrs):
                            run_and_record(task, optimizer, rank, lr, seed, args)
            if args.rank_study:
                task = args.rank_study
                lr = chosen(load_results(tag))[(task, "umtam")]["lr"]
                for rank in (4, 16, 32):
                    run_and_record(task, "umtam", rank, lr, seed, args)
    results = load_results(tag, seeds + (() if SELECTION_SEED in seeds else (SELECTION_SEED,)))
    check_results_exist(results, tag, seeds)
    print(sweep_table([row for row in results if row["seed"] in seeds]))
    print()
    print(lr_grid_table(results))
    print()
    print(quality_table(results, seeds, args.data_dir, eval_cap(profile)))
    print()
    print(rank_table_and_plot(results))
    print()
    print(variants_table(results, seeds))
    return 0


def lrs_to_train(task: str, optimizer: str, grid: dict[str, list[float]], tag: str, chosen_only: bool) -> list[float]:
    """The grid's rates, or with --chosen-lrs the one the selection seed's holdout chose (refused if none yet)."""
    if not chosen_only:
        return grid[optimizer]
    best = chosen(load_results(tag, (SELECTION_SEED,))).get((task, optimizer))
    if best is None:
        raise SystemExit(f"experts.py: no seed-{SELECTION_SEED} results for {tag} {task} {optimizer} to choose an lr "
                         "from; run the lr grid first")
    return [best["lr"]]


if __name__ == "__main__":
    sys.exit(main())
