"""Fuzz the checkpoint loaders outside pytest, with the strategies tests/test_fuzz.py uses.

    python bench/fuzz.py                      # 10,000 random cases, seed 0, then the sidecar sweep
    python bench/fuzz.py --cases 2000 --seed 3
    python bench/fuzz.py --first 1234 --cases 1   # replay one case

Each random case copies a small valid checkpoint, mutates its sidecar,
model.safetensors or stats.safetensors (tests/fuzz_strategies.py) and reads it
as inspect, prune, merge and eval do; case i draws from
random.Random(f"{seed}:{i}"). The sweep then deletes every field of the
train, prune and merge sidecars, or gives it each other JSON type, one at a
time. The only acceptable failure is umtam's own UmtamError: the script prints
the counts (successes, umtam errors by class, other exceptions, the slowest
case, the peak RSS growth) and exits 1 if any other exception escaped or memory
grew past RSS_GROWTH_LIMIT.
"""

from __future__ import annotations

import argparse
import functools
import random
import resource
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzz_strategies import (case_outcome, exercise, inspect_sidecar, make_case, sidecar_variants,  # noqa: E402
                             single_point_mutations, write_seed_checkpoint)
from umtam.errors import UmtamError  # noqa: E402

# Reading a checkpoint of a few hundred bytes should need almost no memory; a header
# that made a loader allocate what it claims would show here.
RSS_GROWTH_LIMIT = 512 * 1024 * 1024


class Tally:
    """Outcomes of one batch of cases, and the text of every unexpected exception."""

    def __init__(self) -> None:
        self.outcomes: Counter = Counter()
        self.others: list[str] = []
        self.slowest = (0.0, "")

    def run(self, label: str, read) -> None:
        begin = time.perf_counter()
        try:
            self.outcomes[read()] += 1
        except Exception as exc:  # the bug this script looks for: keep it and go on
            self.outcomes["other"] += 1
            self.others.append(f"{label}: {type(exc).__name__}: {exc!s:.200}\n{traceback.format_exc(limit=4)}")
        self.slowest = max(self.slowest, (time.perf_counter() - begin, label))

    def lines(self) -> list[str]:
        errors = {name: count for name, count in sorted(self.outcomes.items()) if name not in ("ok", "other")}
        shown = ", ".join(f"{name} {count}" for name, count in errors.items()) or "none"
        return [f"successes: {self.outcomes['ok']}", f"umtam errors: {sum(errors.values())} ({shown})",
                f"other exceptions: {self.outcomes['other']}"]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def random_cases(args, seed_dir: Path, scratch: Path) -> tuple[Tally, Counter]:
    tally, targets = Tally(), Counter()
    for index in range(args.first, args.first + args.cases):
        case_dir = scratch / f"case-{index}"
        targets[make_case(random.Random(f"{args.seed}:{index}"), seed_dir, case_dir)] += 1
        tally.run(f"case {index}", lambda case=case_dir: case_outcome(exercise(case)))
        shutil.rmtree(case_dir, ignore_errors=True)
    return tally, targets


def sidecar_sweep(seed_dir: Path) -> Tally:
    tally = Tally()
    for kind, document in sidecar_variants(seed_dir).items():
        for where, mutated in single_point_mutations(document):
            tally.run(f"{kind} sidecar, {where}", functools.partial(_inspect_outcome, seed_dir, mutated))
    return tally


def _inspect_outcome(seed_dir: Path, sidecar) -> str:
    try:
        inspect_sidecar(seed_dir, sidecar)
    except UmtamError as error:
        return type(error).__name__
    return "ok"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="how many random cases to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case generator")
    parser.add_argument("--first", type=int, default=0, help="index of the first case (to replay one)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="umtam-fuzz-") as scratch:
        seed_dir = write_seed_checkpoint(Path(scratch) / "seed")
        rss_before = peak_rss_bytes()
        started = time.perf_counter()
        tally, targets = random_cases(args, seed_dir, Path(scratch))
        elapsed = time.perf_counter() - started
        sweep = sidecar_sweep(seed_dir)
        rss_growth = peak_rss_bytes() - rss_before
    print(f"cases run: {sum(tally.outcomes.values())} (seed {args.seed}, first {args.first}) in {elapsed:.1f} s")
    print(f"mutated: {', '.join(f'{name} {count}' for name, count in sorted(targets.items()))}")
    print("\n".join(tally.lines()))
    print(f"slowest case: {tally.slowest[0] * 1000:.1f} ms ({tally.slowest[1]}); "
          f"peak RSS growth {rss_growth / 2**20:.1f} MiB")
    print(f"sidecar sweep (every field deleted or retyped): {sum(sweep.outcomes.values())} cases; "
          + "; ".join(sweep.lines()))
    for text in (tally.others + sweep.others)[:10]:
        print(text, file=sys.stderr)
    failed = tally.outcomes["other"] + sweep.outcomes["other"]
    return 1 if failed or rss_growth > RSS_GROWTH_LIMIT else 0


if __name__ == "__main__":
    sys.exit(main())
