"""Write GLUE tasks as ``umtam train --task choice`` data: instruction rows whose answers are label words.

    python tools/glue_as_choices.py --tasks sst2,rte --out runs/data/choice --max-train-rows 4000

writes runs/data/choice/<task>/train.jsonl (the task's train split, or a seeded
subset of it) and validation.jsonl (dev); umtam.glue_prompts holds each task's
prompt and label words. Train on them with a held-out slice for tuning:

    umtam train --task choice --model runs/models/smollm2-135m-instruct \\
        --data runs/data/choice/sst2/train.jsonl --eval-data runs/data/choice/sst2/validation.jsonl \\
        --holdout-fraction 0.1 -o runs/smol-sst2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from umtam.errors import UmtamError  # noqa: E402
from umtam.glue_prompts import PROMPTS, write_choice_files  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", required=True, help=f"comma list of {', '.join(PROMPTS.names())}")
    parser.add_argument("--out", required=True, type=Path, help="folder for one subfolder per task")
    parser.add_argument("--data-dir", help="GLUE folder (default: umtam's data search, ../shared/data/glue)")
    parser.add_argument("--max-train-rows", type=int, help="a seeded subset of each train split")
    parser.add_argument("--seed", type=int, default=0, help="seed of that subset")
    args = parser.parse_args()
    try:
        for task in args.tasks.split(","):
            paths = write_choice_files(task, args.out / PROMPTS.get(task).task, data_dir=args.data_dir,
                                       max_train_rows=args.max_train_rows, seed=args.seed)
            print(f"{task}: " + ", ".join(str(path) for path in paths.values()))
    except UmtamError as exc:
        print(f"glue_as_choices: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
