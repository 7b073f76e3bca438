"""Causal-LM runs on real text, before and after: a pretrained decoder fine-tuned per optimizer, or a model from scratch.

    # SmolLM2-135M-Instruct (README: "SmolLM2") on the FineWeb sample, umtam vs adamw
    python bench/lm_finetune.py --name smollm2-fineweb --model runs/models/smollm2-135m-instruct \\
        --data ../shared/data/lm/fineweb_legal_pilot/train.jsonl \\
        --eval-data ../shared/data/lm/fineweb_legal_pilot/validation.jsonl --optimizers umtam,adamw \\
        --steps 150 --dtype bf16

    # a GPT-2-small-shaped model from scratch on tinyshakespeare (loss curve PNG beside the result)
    python bench/lm_finetune.py --name gpt2small-shakespeare --model recipes/models/gpt2-small --from-scratch \\
        --tokenizer ../shared/models/gpt2-tokenizer --data ../shared/data/lm/tinyshakespeare/train.txt \\
        --eval-data ../shared/data/lm/tinyshakespeare/val.txt --optimizers adamw --lrs adamw=6e-4 --steps 300

Each optimizer's run is one ``umtam train --task lm`` (its registry default lr
unless --lrs says otherwise; nothing here is tuned, and one seed is one seed),
then ``umtam eval --task lm`` of the checkpoint in float32 on the same
validation blocks (--eval-blocks of them, seeded) on which the pretrained model
is scored first ("before"; skipped from scratch). The result JSON under
bench/results/lm/ holds the commands, validation loss and perplexity before and
after, the optimizer state bytes, seconds per step and the loss curve;
checkpoints stay under --runs-dir (never committed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("bench/results/lm")


def main() -> None:
    args = parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    result = json.loads(out.read_text()) if out.exists() else {"name": args.name, "runs": {}}
    if not args.from_scratch and "before" not in result:
        result["before"] = base_perplexity(args)
        write(out, result)
    lrs = dict(item.split("=") for item in args.lrs.split(",")) if args.lrs else {}
    for optimizer in args.optimizers.split(","):
        if optimizer in result["runs"]:
            if args.rescore:  # the finished run's checkpoint scored again, training kept
                result["runs"][optimizer].update(score(args, run_dir(args, optimizer)))
                write(out, result)
            continue
        result["runs"][optimizer] = one_run(args, optimizer, lrs.get(optimizer))
        write(out, result)  # each run lands as it finishes
    print(json.dumps(summary(result), indent=1))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--eval-data", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--from-scratch", action="store_true")
    parser.add_argument("--optimizers", default="umtam,adamw")
    parser.add_argument("--lrs", help="optimizer=lr,... (default: each optimizer's registry default)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs-dir", default="runs/lm")
    parser.add_argument("--rescore", action="store_true", help="score finished runs' checkpoints again")
    return parser.parse_args()


def base_perplexity(args) -> dict:
    """The pretrained model on the validation blocks ``umtam eval`` will score, in float32."""
    from umtam import models
    from umtam.data import subsample
    from umtam.objectives import language
    from umtam.tasks import get_task

    spec = get_task("lm")
    source = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(models.tokenizer_source(source, args.tokenizer))
    features = language.featurizer(spec, tokenizer, args.max_length)(language.read_items(spec, args.eval_data))
    features = subsample(features, args.eval_blocks, args.seed)
    model = models.load_causal_lm(source).float()
    started = time.perf_counter()
    metrics = language.evaluate(model, features, "base", pad_token_id=tokenizer.pad_token_id, batch_size=8)
    return {**metrics, "seconds": time.perf_counter() - started}


def run_dir(args, optimizer: str) -> Path:
    return Path(args.runs_dir) / f"{args.name}-{optimizer}"


def one_run(args, optimizer: str, lr: str | None) -> dict:
    output = run_dir(args, optimizer)
    train = ["umtam", "train", "--task", "lm", "--model", args.model, "--data", args.data,
             "--eval-data", args.eval_data, "--optimizer", optimizer, "--max-steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
             "--max-eval-samples", str(args.eval_blocks), "--dtype", args.dtype, "--seed", str(args.seed),
             "--plot-loss", "-o", str(output), "--force", "--quiet"]
    if optimizer != "adamw":
        train += ["--rank", str(args.rank)]
    if lr:
        train += ["--lr", lr]
    if args.from_scratch:
        train += ["--from-scratch"]
    if args.tokenizer:
        train += ["--tokenizer", args.tokenizer]
    started = time.perf_counter()
    cli(train)
    wall = time.perf_counter() - started
    sidecar = json.loads((output / "umtam.json").read_text())
    (task, record), = sidecar["tasks"].items()
    return {
        "command": " ".join(train),
        "lr": sidecar["training"]["config"]["lr"],
        "train_validation": record["metrics"]["validation"],  # under --dtype autocast, as training ran
        **score(args, output),
        "optimizer_state_bytes": sidecar["optimizer"]["state_bytes"],
        "seconds_per_step": sidecar["seconds_per_step"],
        "peak_rss_bytes": sidecar["peak_rss_bytes"],
        "wall_seconds": wall,
        "loss_curve": sidecar["training"]["loss_curve"],
        "loss_plot": str(output / "loss_curve.png"),
    }


def score(args, output: Path) -> dict:
    """The checkpoint in float32 on the validation blocks "before" scored: same length, count and seed."""
    command = ["umtam", "eval", str(output), "--task", "lm", "--max-length", str(args.max_length),
               "--max-eval-samples", str(args.eval_blocks), "--seed", str(args.seed), "--batch-size", "8",
               "--json", "--quiet"]
    evaluation = json.loads(cli(command))
    (result,) = evaluation["tasks"].values()
    return {"after": result["splits"]["validation"], "eval_command": " ".join(command)}


def cli(argv: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "umtam_cli", *argv[1:]], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.stdout


def write(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


def summary(result: dict) -> dict:
    before = result.get("before", {}).get("perplexity")
    return {"before": before, **{name: {"after": run["after"]["perplexity"], "state_bytes": run["optimizer_state_bytes"],
                                        "s/step": run["seconds_per_step"]} for name, run in result["runs"].items()}}


if __name__ == "__main__":
    main()
