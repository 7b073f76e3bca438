"""Decoder experts on distinct capabilities, for merging (issue 16 item 3, OTA's setting made small).

    python bench/decoder_experts.py --config recipes/paper/decoder-experts.yaml            # train
    python bench/decoder_experts.py --config recipes/paper/decoder-experts.yaml --report   # table only
    python bench/decoder_experts.py --config recipes/paper/decoder-experts.yaml --optimizers umtam \
        --experts choice-sst2,choice-rte                                                # part of it
    python bench/merges.py --config recipes/paper/decoder-merge-umtam.yaml --model runs/models/smollm2-135m-instruct

Each recipe expert is one capability of a pretrained decoder: a GLUE task cast
as label-word instructions (``glue: sst2``: --task choice on the rows
tools/glue_as_choices.py writes, scored by choice accuracy) or language
modelling of a text (--task lm, scored by perplexity); each is trained once per
optimizer (UMTAM, and AdamW with the curvature tracker beside it) and seed,
with the same steps and a 10% holdout slice of its training rows (documents,
for text) kept unseen, on which bench/merges.py chooses merge settings. A text
that is one document (tinyshakespeare's train.txt) is cut into its blank-line
separated passages (``passages: true``), so it has documents to hold out.

Checkpoints go to <runs_dir>/<model>-s<seed>-<expert>-<optimizer>[-r<rank>]-lr<lr>
(what bench/merges.py reads) and are never committed; one small JSON per run
goes to bench/results/decoder_experts/<name>/, and beside it in base/ the
pretrained model's scores on the same rows (what fine-tuning started from).
Runs whose JSON exists are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = Path("bench/results/decoder_experts")
HOLDOUT = 0.1  # as bench/merges.py's HOLDOUT
BASE = "base"  # subfolder of a result set: the pretrained model's scores on each expert's rows


def load_sweep(path: str) -> dict:
    """The recipe through umtam's loader: unknown keys and wrong types refused in one line."""
    from umtam.config import Schema, build_config, load_recipe as read, option

    class DecoderExperts(Schema):
        name: str = option(help="Results subfolder under bench/results/decoder_experts/.")
        model: str = option(help="The pretrained decoder every expert starts from.")
        seeds: list[int] = option(help="Training seeds.")
        optimizers: dict[str, dict[str, Any]] = option(help="optimizer -> {lr, rank}.")
        experts: dict[str, dict[str, Any]] = option(help="expert -> {glue | task + data + eval_data, steps, "
                                                          "batch_size, max_length, passages}.")
        dtype: str = option("bf16", help="Autocast dtype of the forward and backward passes.")
        max_eval_samples: int = option(200, ge=1, help="Rows (or blocks) scored per split.")
        data_dir: str = option("runs/data", help="Where generated data (choice rows, passages) is written.")
        runs_dir: str = option("runs/experts", help="Where checkpoints go.")

    return build_config(DecoderExperts, read(path), source=str(path)).model_dump()


def run_name(recipe: dict, expert: str, optimizer: str, seed: int) -> str:
    from experts import model_tag

    settings = recipe["optimizers"][optimizer]
    rank = f"-r{settings['rank']}" if "rank" in settings else ""
    return f"{model_tag(recipe['model'])}-s{seed}-{expert}-{optimizer}{rank}-lr{settings['lr']:g}"


def expert_data(recipe: dict, spec: dict) -> dict[str, str]:
    """The task, --data and --eval-data of one expert, writing generated data once."""
    from umtam.glue_prompts import write_choice_files

    if "glue" in spec:
        folder = Path(recipe["data_dir"]) / "choice" / spec["glue"]
        if not (folder / "validation.jsonl").exists():
            write_choice_files(spec["glue"], folder, max_train_rows=spec.get("max_train_rows"), seed=0)
        return {"task": "choice", "data": str(folder / "train.jsonl"), "eval_data": str(folder / "validation.jsonl")}
    if not spec.get("passages"):
        return {"task": spec["task"], "data": spec["data"], "eval_data": spec["eval_data"]}
    folder = Path(recipe["data_dir"]) / "lm" / Path(spec["data"]).parent.name
    if not (folder / "validation.jsonl").exists():
        write_passages({"train.jsonl": Path(spec["data"]), "validation.jsonl": Path(spec["eval_data"])}, folder)
    return {"task": spec["task"], "data": str(folder / "train.jsonl"), "eval_data": str(folder / "validation.jsonl")}


def write_passages(text_files: dict[str, Path], out: Path) -> None:
    """Each .txt cut at blank lines into one JSON document per passage, as ``out``/<name>: the folder is
    written whole or not at all (umtam.atomic.write_jsonl_directory)."""
    from umtam.atomic import write_jsonl_directory

    def passages(text_file: Path) -> list[dict]:
        return [{"text": p.strip()} for p in text_file.read_text(encoding="utf-8").split("\n\n") if p.strip()]

    write_jsonl_directory(out, {name: passages(text_file) for name, text_file in text_files.items()},
                          what="passages")


def train_one(recipe: dict, expert: str, optimizer: str, seed: int) -> dict:
    from umtam.config import build_config
    from umtam.machine import machine_name
    from umtam.train import TrainConfig, train

    spec = recipe["experts"][expert]
    settings = recipe["optimizers"][optimizer]
    name = run_name(recipe, expert, optimizer, seed)
    fields = {**expert_data(recipe, spec), "model": recipe["model"], "optimizer": optimizer, "lr": settings["lr"],
              "max_steps": spec["steps"], "epochs": 1000, "batch_size": spec["batch_size"],
              "max_length": spec["max_length"], "holdout_fraction": HOLDOUT, "seed": seed, "dtype": recipe["dtype"],
              "max_eval_samples": recipe["max_eval_samples"], "output": str(Path(recipe["runs_dir"]) / name),
              "force": True, **({"rank": settings["rank"]} if "rank" in settings else {})}
    started = time.perf_counter()
    checkpoint = train(build_config(TrainConfig, fields, source="decoder_experts"))
    sidecar = checkpoint.sidecar.as_json()
    (key, record), = sidecar["tasks"].items()
    return {"name": name, "expert": expert, "task": key, "optimizer": optimizer, "seed": seed, **settings,
            "steps": spec["steps"], "validation": record["metrics"]["validation"],
            "holdout": record["holdout_metrics"], "wall_seconds": time.perf_counter() - started,
            "seconds_per_step": sidecar["seconds_per_step"], "state_bytes": sidecar["optimizer"]["state_bytes"],
            "device": machine_name()}


def score_base(recipe: dict, name: str, seed: int) -> dict:
    """The pretrained model on exactly the rows expert ``name`` was scored on (its validation and its
    holdout slice, as bench/merges.py scores them): what fine-tuning started from."""
    from umtam import models
    from umtam.checkpoint import load_checkpoint
    from umtam.evaluate import evaluate_checkpoint
    from umtam.weights import model_tensors

    checkpoint = load_checkpoint(Path(recipe["runs_dir"]) / name)
    weights = model_tensors(models.load_causal_lm(models.resolve_model(recipe["model"])))
    scored = {}
    for split, fraction in (("validation", 0.0), ("holdout", HOLDOUT)):
        (task, result), = evaluate_checkpoint(checkpoint, task="glue", max_eval_samples=recipe["max_eval_samples"],
                                              seed=seed, holdout_fraction=fraction, weights=weights).items()
        (scored[split],) = result["splits"].values()
    return {"name": name, "task": task, "model": recipe["model"], **scored}


def report(recipe: dict) -> str:
    from umtam.tasks import task_spec

    folder = RESULTS / recipe["name"]
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not rows:
        raise SystemExit(f"decoder_experts.py: no results under {folder}; train them first")
    bases = {p.stem: json.loads(p.read_text()) for p in sorted((folder / BASE).glob("*.json"))}
    lines = ["| expert | task | optimizer | seed | pretrained: validation / holdout | expert: validation | "
             "holdout | s/step | state |", "|---" * 9 + "|"]
    for row in rows:
        metric, base = task_spec(row["task"]).metrics[0], bases.get(row["name"])  # the task's registered score
        before = f"{base['validation'][metric]:.4g} / {base['holdout'][metric]:.4g}" if base else "-"
        lines.append(f"| {row['expert']} | {row['task']} | {row['optimizer']} | {row['seed']} | {before} "
                     f"| {metric} {row['validation'][metric]:.4g} | {row['holdout'][metric]:.4g} "
                     f"| {row['seconds_per_step']:.2f} | {row['state_bytes'] / 2**20:.1f} MiB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="e.g. recipes/paper/decoder-experts.yaml")
    parser.add_argument("--report", action="store_true", help="only print the table")
    parser.add_argument("--rebuild-missing", action="store_true",
                        help="also retrain experts whose result exists but whose checkpoint is gone (a new machine: "
                             "the merges read the checkpoints)")
    parser.add_argument("--experts", help="comma list: train only these of the recipe's experts (two processes can "
                                          "split a recipe)")
    parser.add_argument("--optimizers", help="comma list: only these of the recipe's optimizers")
    args = parser.parse_args()
    recipe = load_sweep(args.config)
    if not args.report:
        from experts import named_subset

        recipe = {**recipe, "experts": named_subset(recipe["experts"], args.experts, "decoder_experts.py: --experts"),
                  "optimizers": named_subset(recipe["optimizers"], args.optimizers,
                                             "decoder_experts.py: --optimizers")}
        out = RESULTS / recipe["name"]
        out.mkdir(parents=True, exist_ok=True)
        for seed in recipe["seeds"]:
            for optimizer in recipe["optimizers"]:
                for expert in recipe["experts"]:
                    name = run_name(recipe, expert, optimizer, seed)
                    path = out / f"{name}.json"
                    checkpoint = Path(recipe["runs_dir"]) / name
                    gone = args.rebuild_missing and not checkpoint.exists()
                    if gone or not path.exists():
                        row = train_one(recipe, expert, optimizer, seed)
                        path.write_text(json.dumps(row, indent=1) + "\n")
                        print(f"{row['name']}: {row['validation']} ({row['wall_seconds']:.0f} s)", flush=True)
                    base = out / BASE / f"{name}.json"
                    if not base.exists() and checkpoint.exists():
                        base.parent.mkdir(exist_ok=True)
                        base.write_text(json.dumps(score_base(recipe, name, seed), indent=1) + "\n")
    print(report(recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
