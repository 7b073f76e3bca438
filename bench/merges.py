"""Merge experts with several methods and settings; score each on the holdout slice and on dev.

    python bench/merges.py --experts runs/experts/mrpc-umtam-r8-lr0.0002,runs/experts/rte-umtam-r8-lr0.0002 \\
        --grid "umtam:norms=average;umtam:norms=base" --name norms
    python bench/merges.py --report norms

Settings are meant to be chosen on the holdout score (the fixed train slice
the experts never saw, see bench/experts.py) and dev reported for the chosen
ones. Each grid entry is "method:key=value,key=value". Merged checkpoints are
written to a scratch directory and deleted; the small JSON results go to
bench/results/merges/<name>/ and runs whose JSON exists are skipped.
"""

from __future__ import annotations

import argparse
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
        holdout = evaluate_checkpoint(ckpt, "glue", holdout_fraction=HOLDOUT, **common)
        dev = evaluate_checkpoint(ckpt, "glue", **common)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", help="comma list of expert checkpoint directories")
    parser.add_argument("--grid", help="';'-separated method:key=value,... entries")
    parser.add_argument("--name", default="default", help="results subfolder")
    parser.add_argument("--data-dir")
    parser.add_argument("--scratch", default=None, help="where merged checkpoints are written (then deleted)")
    parser.add_argument("--report", metavar="NAME", help="only print the table of an existing result set")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return 0
    out = Path("bench/results/merges") / args.name
    out.mkdir(parents=True, exist_ok=True)
    experts = [Path(p) for p in args.experts.split(",")]
    for entry in args.grid.split(";"):
        method, options = parse_entry(entry)
        path = out / f"{label(method, options)}.json"
        if path.exists():
            continue
        row = merge_and_score(experts, method, options, args)
        path.write_text(json.dumps(row, indent=1) + "\n")
        print(f"{label(method, options)}: holdout {row['holdout_avg']:.4f} dev {row['dev_avg']:.4f}", flush=True)
    print(report(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
