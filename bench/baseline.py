"""Baseline figure: AdamW fine-tuning of the default model on real MRPC.

    python bench/baseline.py                  # 3 epochs, batch 32, max length 128
    python bench/baseline.py --epochs 1 --out bench/results/baseline-1ep.json

Prints dev accuracy and F1 and the wall time, and writes them as JSON.
GLUE comes from --data-dir, $UMTAM_DATA_DIR or ../shared/data/glue.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="bench/results/baseline.json")
    args = parser.parse_args()

    import torch

    from umtam.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig(task=args.task, output=str(Path(scratch) / "ckpt"), optimizer=args.optimizer,
                             epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                             seed=args.seed, data_dir=args.data_dir)
        started = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - started
    record = result.sidecar.as_json()["tasks"][args.task]
    report = {
        "command": "python " + " ".join(sys.argv),
        "task": args.task, "optimizer": args.optimizer, "epochs": args.epochs,
        "batch_size": args.batch_size, "max_length": args.max_length, "seed": args.seed,
        "lr": config.learning_rate, "steps": result.sidecar.as_json()["steps"],
        "dev": record["metrics"], "wall_seconds": round(wall, 1),
        "seconds_per_step": result.sidecar.as_json()["seconds_per_step"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": "cpu",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for split, metrics in report["dev"].items():
        shown = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"{args.task} {split}: {shown}")
    print(f"wall time {wall:.0f} s for {report['steps']} steps ({report['seconds_per_step']:.2f} s/step), "
          f"{report['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
