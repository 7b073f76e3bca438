"""Optimizer memory and speed on the default model: every optimizer in one run.

    python bench/optim.py                      # 100 steps each, MRPC, batch 32, max length 128
    python bench/optim.py --steps 50 --device cpu --out bench/results/optim-cpu.json

Each configuration trains in its own process (so peak RSS is its own) through
`umtam train --max-steps N`, then its sidecar is read back. Ratios are against
AdamW measured in the same run.

Step time is also measured interleaved (--interleaved K): one process holds a
copy of the model per configuration and, for each of K batches, runs every
configuration's forward, backward, tracker update and optimizer step back to
back on the same batch. Load from anything else on the machine then falls on
every configuration alike, which the sequential runs cannot promise on a shared
2-core machine; the median over the K steps (after one warm-up step) is
reported. Targets (issue 3): UMTAM r=8 optimizer state
<= 0.02x AdamW's, step time <= 1.25x, peak RSS below AdamW's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [
    ("adamw", "adamw", {}),
    ("umtam r=4", "umtam", {"rank": 4}),
    ("umtam r=8", "umtam", {"rank": 8}),
    ("umtam r=32", "umtam", {"rank": 32}),
    ("galore r=8", "galore", {"rank": 8}),
    ("mofasgd r=8", "mofasgd", {"rank": 8}),
    ("adafactor", "adafactor", {}),
]


def run_one(label, optimizer, extra, args, scratch) -> dict:
    out = Path(scratch) / label.replace(" ", "_").replace("=", "")
    command = [sys.executable, "-m", "umtam_cli", "train", "--task", args.task, "--optimizer", optimizer,
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--seed", str(args.seed), "--max-eval-samples", "64",
               "--device", args.device, "-o", str(out), "--json", "--quiet"]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sidecar = json.loads((out / "umtam.json").read_text())
    training = sidecar["training"]
    return {
        "label": label, "optimizer": optimizer, **extra,
        "state_bytes": sidecar["optimizer"]["state_bytes"],
        "optimizer_only_bytes": sidecar["optimizer"].get("optimizer_bytes", sidecar["optimizer"]["state_bytes"]),
        "seconds_per_step": sidecar["seconds_per_step"],
        "peak_rss_bytes": sidecar["peak_rss_bytes"],
        "peak_gpu_bytes": sidecar.get("peak_gpu_bytes"),
        "final_loss": training["final_loss"],
        "lr": training["config"]["lr"] or None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir")
    parser.add_argument("--only", help="comma list of labels to run (default: all)")
    parser.add_argument("--interleaved", type=int, default=10, metavar="K",
                        help="also time K interleaved steps per configuration in one process (0: skip)")
    parser.add_argument("--out", default="bench/results/optim.json")
    parser.add_argument("--reuse", help="take the per-process rows from this earlier result JSON (rerun only the "
                                        "interleaved timing)")
    args = parser.parse_args()

    import torch

    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    if args.reuse:
        rows = json.loads(Path(args.reuse).read_text())["rows"]
    with tempfile.TemporaryDirectory() as scratch:
        for label, optimizer, extra in CONFIGS if not rows else ():
            if wanted is None or label in wanted or label == "adamw":
                rows.append(run_one(label, optimizer, extra, args, scratch))
                print(f"done {label}", file=sys.stderr, flush=True)
    if args.interleaved:
        medians = interleaved_step_times(rows, args)
        for row in rows:
            row["interleaved_seconds_per_step"] = medians[row["label"]]
    base = rows[0]
    for row in rows:
        if "interleaved_seconds_per_step" in row:
            row["interleaved_time_ratio"] = row["interleaved_seconds_per_step"] / base["interleaved_seconds_per_step"]
        row["state_ratio"] = row["optimizer_only_bytes"] / base["optimizer_only_bytes"]
        row["time_ratio"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["rss_ratio"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    report = {"command": "python " + " ".join(sys.argv), "machine": machine, "torch": torch.__version__,
              "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    return 0


def interleaved_step_times(rows, args) -> dict[str, float]:
    """Median seconds per full training step of each configuration, timed in turns on shared batches."""
    import statistics
    import time

    import torch

    from umtam import batching, data, models
    from umtam.optim import OPTIMIZERS, build_optimizer
    from umtam.optim.tracker import CurvatureTracker
    from umtam.tasks import get_task
    from umtam.train import seed_everything

    seed_everything(args.seed)
    spec = get_task(args.task)
    task_data = data.load_task(spec.name, data_dir=args.data_dir, seed=args.seed)
    source = models.resolve_model(None)
    tokenizer = models.load_tokenizer(source)
    features = batching.encode(task_data.train, tokenizer, args.max_length)
    batches = list(batching.iter_batches(features, args.batch_size, pad_token_id=tokenizer.pad_token_id,
                                     seed=args.seed, epoch=0))[: args.interleaved + 1]
    runners = []
    for row in rows:
        torch.manual_seed(args.seed)
        model = models.load_classifier(source, num_labels=spec.num_labels, label_names=spec.label_names)
        model.train()
        optimizer = build_optimizer(row["optimizer"], list(model.named_parameters()),
                                    lr=row["lr"] or OPTIMIZERS.get(row["optimizer"]).default_lr, rank=row.get("rank", 8),
                                    weight_decay=0.01)
        tracker = CurvatureTracker(model.named_parameters(), beta2=0.999, optimizer=optimizer)
        runners.append((row["label"], model, optimizer, tracker))
    times: dict[str, list[float]] = {label: [] for label, *_ in runners}
    for index, batch in enumerate(batches):
        for label, model, optimizer, tracker in runners:
            started = time.perf_counter()
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            tracker.update()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index > 0:  # the first step pays factor initialisation and allocator warm-up
                times[label].append(time.perf_counter() - started)
        print(f"interleaved step {index + 1}/{len(batches)}", file=sys.stderr, flush=True)
    return {label: statistics.median(values) for label, values in times.items()}


def markdown_table(report) -> str:
    lines = [f"{report['steps']} steps, batch {report['batch_size']}, max length {report['max_length']}, "
             f"{report['machine']}, torch {report['torch']}", "",
             "| optimizer | lr | state MiB | state / AdamW | s/step (own run) | time / AdamW | s/step (interleaved) "
             "| time / AdamW (interleaved) | peak RSS MiB | RSS / AdamW | peak GPU MiB | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        gpu = f"{row['peak_gpu_bytes'] / 2**20:.0f}" if row.get("peak_gpu_bytes") else "-"
        lines.append(
            f"| {row['label']} | {row['lr']:.0e} | {row['optimizer_only_bytes'] / 2**20:.2f} | {row['state_ratio']:.4f} "
            f"| {row['seconds_per_step']:.3f} | {row['time_ratio']:.2f} "
            f"| {row.get('interleaved_seconds_per_step', float('nan')):.3f} "
            f"| {row.get('interleaved_time_ratio', float('nan')):.2f} | {row['peak_rss_bytes'] / 2**20:.0f} "
            f"| {row['rss_ratio']:.2f} | {gpu} | {row['final_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
