"""Merge experts with several methods and settings; score each on the holdout slice and on dev.

    python bench/merges.py --experts runs/experts/mrpc-umtam-r8-lr0.0002,runs/experts/rte-umtam-r8-lr0.0002 \\
        --grid "umtam:norms=average;umtam:norms=base" --name norms
    python bench/merges.py --report norms
    python bench/merges.py --config recipes/paper/merge-sweep.yaml      # the paper's merge table
    python bench/merges.py --config recipes/paper/merge-sweep.yaml --report

Settings are chosen on the holdout score (the fixed train slice the experts
never saw, see bench/experts.py) and dev is reported for the chosen ones; the
best-on-dev setting of each method is shown beside it, labelled as such. Each
--grid entry is "method:key=value,key=value". A --config recipe names the
experts and a grid per method (lists are swept as a product), and optionally
`refine`: values swept next around each method's holdout-best setting (e.g.
lambda once keep is chosen), so a two-stage sweep costs a sum, not a product;
or `chosen_from: <result set>`: each entry starts from its method's
holdout-chosen setting there (the ablation, the AdamW-statistics merge).
Merged checkpoints are written to a scratch directory and deleted; the small
JSON results go to bench/results/merges/<name>/ and runs whose JSON exists are
skipped, so every sweep resumes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

HOLDOUT = 0.1
EVAL_CAP = 2000


def parse_entry(entry: str) -> tuple[str, dict]:
    method, _, rest = entry.partition(":")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        options[key.strip()] = yaml.safe_load(value)
    return method.strip(), options


def label(method: str, options: dict) -> str:
    return method + "".join(f"-{key}{value}" for key, value in sorted(options.items()))


def merge_and_score(experts, method, options, args) -> dict:
    from umtam.checkpoint import load_checkpoint
    from umtam.evaluate import evaluate_checkpoint
    from umtam.merge import merge_checkpoints

    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        started = time.perf_counter()
        merged, _ = merge_checkpoints(experts, Path(scratch) / "merged", method=method, options=options)
        merge_seconds = time.perf_counter() - started
        ckpt = load_checkpoint(merged.path)
        common = dict(data_dir=args.data_dir, max_eval_samples=EVAL_CAP, seed=42)
        holdout = evaluate_checkpoint(ckpt, task="glue", holdout_fraction=HOLDOUT, **common)
        dev = evaluate_checkpoint(ckpt, task="glue", **common)
    return {"method": method, "options": options, "experts": [str(e) for e in experts],
            "merge_seconds": merge_seconds, "holdout": holdout, "dev": dev,
            "holdout_avg": mean(r["score"] for r in holdout.values()),
            "holdout_norm_avg": mean(r["normalized"] for r in holdout.values()),
            "dev_avg": mean(r["score"] for r in dev.values()),
            "dev_norm_avg": mean(r["normalized"] for r in dev.values())}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def report(name: str) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((Path("bench/results/merges") / name).glob("*.json"))]
    if not rows:
        return f"no results under bench/results/merges/{name}"
    tasks = list(rows[0]["dev"])
    header = ("| setting | holdout avg (norm) | dev avg (norm) | " + " | ".join(f"dev {t}" for t in tasks) + " |")
    lines = [header, "|" + "---|" * (3 + len(tasks))]
    for row in sorted(rows, key=lambda r: -r["holdout_avg"]):
        per_task = " | ".join(f"{100 * row['dev'][t]['score']:.2f}" for t in tasks)
        lines.append(f"| {label(row['method'], row['options'])} | {100 * row['holdout_avg']:.2f} "
                     f"({100 * row['holdout_norm_avg']:.1f}%) | {100 * row['dev_avg']:.2f} "
                     f"({100 * row['dev_norm_avg']:.1f}%) | {per_task} |")
    return "\n".join(lines)


def expand_grid(grid: dict) -> list[tuple[str, dict]]:
    """{method: {option: value or [values]}} -> every (method, options) of the product, in order.

    A method may also map to a list of such mappings (e.g. one per ablation),
    each expanded on its own.
    """
    entries = []
    for method, blocks in grid.items():
        for options in blocks if isinstance(blocks, list) else [blocks]:
            options = options or {}
            keys = sorted(options)
            values = [v if isinstance(v, list) else [v] for v in (options[k] for k in keys)]
            entries += [(method, dict(zip(keys, combo))) for combo in itertools.product(*values)]
    return entries


def on_chosen(entries, results_name: str) -> list[tuple[str, dict]]:
    """Each entry's options laid over its method's holdout-chosen setting in another result set."""
    rows = load_rows(results_name)
    out = []
    for method, options in entries:
        stage = [r for r in rows if r["method"] == method]
        chosen = max(stage, key=lambda r: r["holdout_avg"])["options"] if stage else {}
        out.append((method, {**chosen, **options}))
    return out


def load_sweep(path: str) -> dict:
    """The sweep recipe through umtam's loader (unknown keys, types), every grid point's options checked."""
    from typing import Any

    from umtam.config import Schema, build_config, load_recipe, option
    from umtam.merge import get_method

    class MergeSweep(Schema):
        name: str = option(help="Results subfolder under bench/results/merges/.")
        experts: list[str] = option(help="Expert checkpoint directories.")
        grid: dict[str, Any] = option(help="method -> {option: value or [values]} (or a list of such).")
        refine: dict[str, list[Any]] = option(default_factory=dict, help="option -> values swept next "
                                                                          "around each method's holdout-best.")
        chosen_from: str | None = option(None, help="Start each entry from its method's choice in this set.")

    sweep = build_config(MergeSweep, load_recipe(path), source=str(path)).model_dump()
    for method, options in expand_grid(sweep["grid"]):
        get_method(method).resolve_options(options)  # unknown methods, names and bad values raise
    return sweep


def refine_entries(name: str, grid: dict, refine: dict) -> list[tuple[str, dict]]:
    """Each refined option's values around the method's holdout-best stage-one setting."""
    rows = load_rows(name)
    entries = []
    for method in grid:
        stage_one = [r for r in rows if r["method"] == method]
        spec_options = set(_method_options(method))
        sweep = {key: values for key, values in refine.items() if key in spec_options}
        if not stage_one or not sweep:
            continue
        best = max(stage_one, key=lambda r: r["holdout_avg"])["options"]
        for key, values in sweep.items():
            entries += [(method, {**best, key: value}) for value in values]
    return entries


def _method_options(method: str):
    from umtam.merge import get_method

    return [info.key for info in get_method(method).options.options().values()]


def run_entries(experts: list[Path], entries, out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for method, options in entries:
        path = out / f"{label(method, options)}.json"
        if path.exists():
            continue
        row = merge_and_score(experts, method, options, args)
        path.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{label(method, options)}: holdout {row['holdout_avg']:.4f} dev {row['dev_avg']:.4f}", flush=True)


def load_rows(name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path("bench/results/merges") / name).glob("*.json"))]


def chosen_table(name: str) -> str:
    """Per method: the holdout-chosen setting's dev scores, then the best-on-dev setting, labelled."""
    rows = load_rows(name)
    if not rows:
        return f"no results under bench/results/merges/{name}"
    tasks = list(rows[0]["dev"])
    lines = ["| method | chosen by | setting | " + " | ".join(tasks) + " | dev avg | normalised avg |",
             "|---|---|---|" + "---|" * (len(tasks) + 2)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for by, key in (("holdout", "holdout_avg"), ("dev (oracle)", "dev_avg")):
        for method in methods:
            best = max((r for r in rows if r["method"] == method), key=lambda r: r[key])
            setting = ", ".join(f"{k}={v}" for k, v in sorted(best["options"].items())) or "-"
            per_task = " | ".join(f"{100 * best['dev'][t]['score']:.2f}" for t in tasks)
            lines.append(f"| {method} | {by} | {setting} | {per_task} | {100 * best['dev_avg']:.2f} "
                         f"| {100 * best['dev_norm_avg']:.1f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="sweep recipe (name, experts, grid, refine)")
    parser.add_argument("--experts", help="comma list of expert checkpoint directories")
    parser.add_argument("--grid", help="';'-separated method:key=value,... entries")
    parser.add_argument("--name", default="default", help="results subfolder")
    parser.add_argument("--data-dir")
    parser.add_argument("--scratch", default=None, help="where merged checkpoints are written (then deleted)")
    parser.add_argument("--report", nargs="?", const=True, metavar="NAME",
                        help="only print the tables of an existing result set (NAME, or the --config's)")
    args = parser.parse_args()
    sweep = load_sweep(args.config) if args.config else None
    name = sweep["name"] if sweep else args.name
    if args.report:
        name = name if args.report is True else args.report
        print(report(name) + "\n\n" + chosen_table(name))
        return 0
    out = Path("bench/results/merges") / name
    if sweep:
        experts = [Path(p) for p in sweep["experts"]]
        entries = expand_grid(sweep["grid"])
        if sweep.get("chosen_from"):  # settings chosen once, on another sweep's holdout scores
            entries = on_chosen(entries, sweep["chosen_from"])
        run_entries(experts, entries, out, args)
        run_entries(experts, refine_entries(name, sweep["grid"], sweep["refine"]), out, args)
    else:
        experts = [Path(p) for p in args.experts.split(",")]
        run_entries(experts, [parse_entry(entry) for entry in args.grid.split(";")], out, args)
    print(report(name) + "\n\n" + chosen_table(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
