"""Merge experts with several methods and settings; score each on the holdout slice and on dev.

    python bench/merges.py --experts mrpc-umtam-r8-lr0.0002,rte-umtam-r8-lr0.0002 \\
        --grid "umtam:norms=average;umtam:norms=base" --name norms
    python bench/merges.py --report norms
    python bench/merges.py --config recipes/paper/merge-sweep.yaml      # the paper's merge table
    python bench/merges.py --config recipes/paper/merge-sweep.yaml --seeds 42,43,44 --report
    python bench/merges.py --config recipes/paper/merge-sweep.yaml --methods umtam,ties   # half a sweep
    python bench/merges.py --config recipes/paper/merge-sweep.yaml --methods ota --wait 120  # beside training

Settings are chosen on the holdout score (the fixed train slice the experts
never saw, see bench/experts.py) and dev is reported for the chosen ones; the
best-on-dev setting of each method is shown beside it, labelled as such. Each
--grid entry is "method:key=value,key=value". A --config recipe names the
experts and a grid per method (lists are swept as a product), and optionally
`refine`: values swept next around each method's holdout-best setting (e.g.
lambda once keep is chosen), so a two-stage sweep costs a sum, not a product;
then lambda (by factors of 1.5), keep and drop (halving the distance to 0 or 1)
are widened while a method's holdout choice is the edge of the values it tried
(widening_entries), so no choice is cut off;
or `chosen_from: <result set>`: each entry starts from its method's
holdout-chosen setting there (the ablation, the AdamW-statistics merge).
Experts are named as bench/experts.py names them, without model and seed:
--model and --seeds pick the checkpoints (runs/experts/<model>-s<seed>-<expert>),
and the training seed also seeds the evaluation's subsampling and DARE's masks
(unless a setting gives its own DARE seed). Decoder experts (bench/decoder_experts.py:
choice accuracy and perplexity) are averaged by their normalised scores, which
umtam eval computes against each expert's own; GLUE's by their raw scores. Merged checkpoints are written to a
scratch directory and deleted; the small JSON results go to
bench/results/merges/<name>/<model>-s<seed>/ and runs whose JSON exists are
skipped, so every sweep resumes. A report for seeds without results is refused
in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

HOLDOUT = 0.1
EVAL_CAP = 2000


def parse_entry(entry: str) -> tuple[str, dict]:
    from umtam.config.schema import parse_yaml

    method, _, rest = entry.partition(":")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        options[key.strip()] = parse_yaml(value, f"--grid {key.strip()}")
    return method.strip(), options


def label(method: str, options: dict) -> str:
    return method + "".join(f"-{key}{value}" for key, value in sorted(options.items()))


@contextlib.contextmanager
def merged(experts, method: str, options: dict, args):
    """(the merged checkpoint, merge seconds), in a scratch directory deleted afterwards."""
    from umtam.checkpoint import load_checkpoint
    from umtam.merge import merge_checkpoints

    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        started = time.perf_counter()
        written, _ = merge_checkpoints(experts, Path(scratch) / "merged", method=method, options=options)
        seconds = time.perf_counter() - started
        yield load_checkpoint(written.path), seconds


def merge_and_score(experts, method, options, seed: int, args, *, dev: bool = True) -> dict:
    """Merge, score the holdout slice and (``dev``) dev."""
    from umtam.merge import get_method

    takes_seed = "seed" in get_method(method).resolve_options()
    applied = {**({"seed": seed} if takes_seed else {}), **options}  # DARE's masks follow the training seed
    with merged(experts, method, applied, args) as (ckpt, merge_seconds):
        holdout = score(ckpt, seed, args, holdout=True)
        row = {"method": method, "options": options, "applied_options": applied, "seed": seed,
               "experts": [str(e) for e in experts], "eval_cap": args.eval_cap, "merge_seconds": merge_seconds,
               "holdout": holdout,
               "holdout_avg": average(holdout), "avg_is": average_kind(holdout), "dev": None, "dev_avg": None,
               "uncounted": uncounted(holdout)}
        return with_dev(row, ckpt, args) if dev else row


def score(ckpt, seed: int, args, *, holdout: bool) -> dict:
    """Every task the merged checkpoint has, on its holdout slice or on dev (validation text)."""
    from umtam.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, task="glue", data_dir=args.data_dir, max_eval_samples=args.eval_cap, seed=seed,
                               holdout_fraction=HOLDOUT if holdout else 0.0)


def with_dev(row: dict, ckpt, args) -> dict:
    dev = score(ckpt, row["seed"], args, holdout=False)
    return {**row, "dev": dev, "dev_avg": average(dev), "uncounted": sorted(set(row["uncounted"]) | set(uncounted(dev)))}


def score_chosen_on_dev(name: str, tag: str, seeds: tuple[int, ...], experts_of, args, methods) -> None:
    """With ``dev_at: chosen``: dev for each seed's holdout-chosen setting of each of ``methods`` alone (as
    chosen_table chooses), merged again (merging is deterministic). Only this sweep's methods: another
    process sweeping the others into the same folder may not have chosen yet."""
    rows = all_rows(name, tag, seeds)
    for method in dict.fromkeys(row["method"] for row in rows if row["method"] in methods):
        for seed, row in seed_choices(rows, seeds, method, "holdout_avg").items():
            if row["dev"] is not None:
                continue
            with merged(experts_of(seed), method, row["applied_options"], args) as (ckpt, _seconds):
                row = with_dev(row, ckpt, args)
            (results_dir(name, tag, seed) / f"{label(method, row['options'])}.json").write_text(
                json.dumps(row, indent=1) + "\n")
            print(f"{label(method, row['options'])} (holdout-chosen), seed {seed}: dev {row['dev_avg']:.4f}",
                  flush=True)


def average_kind(results: dict) -> str:
    """GLUE scores average as they are; a decoder's tasks (perplexity beside choice accuracy) do not."""
    from umtam.tasks import is_language_key

    return "normalized" if any(map(is_language_key, results)) else "score"


def average(results: dict) -> float:
    """The tasks' mean score, or for a decoder's tasks their mean normalised score (umtam.evaluate) over
    the tasks that have one (``uncounted`` names the others)."""
    if average_kind(results) == "score":
        return mean(r["score"] for r in results.values())
    counted = [r["normalized"] for r in results.values() if r["normalized"] is not None]
    if not counted:  # every expert within NORMALIZE_MARGIN of answering without reading
        raise SystemExit(f"merges.py: no task of {', '.join(results)} has a normalised score")
    return mean(counted)


def uncounted(results: dict) -> list[str]:
    """The tasks a decoder average leaves out: their expert is too close to its no-skill floor."""
    if average_kind(results) == "score":
        return []
    return [task for task, r in results.items() if r["normalized"] is None]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


RESULTS = Path("bench/results/merges")


def results_dir(name: str, tag: str, seed: int) -> Path:
    return RESULTS / name / f"{tag}-s{seed}"


def expert_paths(experts: list[str], runs_dir: str, tag: str, seed: int) -> list[Path]:
    """The checkpoints of this model and seed: <runs_dir>/<model>-s<seed>-<expert>."""
    return [Path(runs_dir) / f"{tag}-s{seed}-{expert}" for expert in experts]


def wait_for_experts(paths: list[Path], minutes: float, poll_seconds: float = 30) -> None:
    """Block until every checkpoint is whole: with --methods, the other process may still be training some.
    The sidecar is written last, so its presence means the checkpoint is complete."""
    from umtam.checkpoint import SIDECAR_FILE

    deadline = time.monotonic() + minutes * 60
    while missing := [path for path in paths if not (path / SIDECAR_FILE).is_file()]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"merges.py: --wait: after {minutes:g} min {len(missing)} expert checkpoint(s) still "
                             f"missing, the first {missing[0]}")
        time.sleep(min(poll_seconds, left))


def settings(name: str, tag: str, seeds: tuple[int, ...]) -> dict[str, dict[int, dict]]:
    """label -> seed -> row, for the seeds asked for; a seed without any result is refused in one line."""
    found: dict[str, dict[int, dict]] = {}
    for row in recount_decoder_averages([row for seed in seeds for row in stored_rows(name, tag, seed)]):
        found.setdefault(label(row["method"], row["options"]), {})[row["seed"]] = row
    missing = [seed for seed in seeds if not any(seed in by_seed for by_seed in found.values())]
    if missing:
        raise SystemExit(f"merges.py: no results for {name!r}, model {tag!r}, seed(s) {', '.join(map(str, missing))} "
                         f"under {RESULTS}; run the sweep for them first")
    return found


def spread(values: list[float], *, percent: bool = False, scale: float = 100) -> str:
    """'83.28' for one seed, '83.28 +- 0.41' (sample standard deviation) for several, in points
    (``scale`` 1: as they are)."""
    import statistics

    form = ".1f" if percent else ".2f"
    mean = format(scale * statistics.mean(values), form) + ("%" if percent else "")
    return mean if len(values) == 1 else f"{mean} +- {format(scale * statistics.stdev(values), form)}"


def task_cell(values: list[float], task: str) -> str:
    """A task's scores in points, or a perplexity as it is."""
    from umtam.tasks import task_spec

    if task_spec(task).higher_is_better:
        return spread(values)
    return spread(values, scale=1)


def avg_cell(runs: list[dict], key: str) -> str:
    """GLUE's raw average in points; a decoder set's normalised average as a percentage of the experts'."""
    if any(r[key] is None for r in runs):
        return "-"
    return spread([r[key] for r in runs], percent=runs[0].get("avg_is") == "normalized")


def dev_cell(runs: list[dict], task: str) -> str:
    return "-" if any(r["dev"] is None for r in runs) else task_cell([r["dev"][task]["score"] for r in runs], task)


class Normaliser:
    """Each task's score as the share of its expert's gain over the no-skill floor (umtam.evaluate).

    Recomputed from the stored raw scores, so results written before the
    definition changed (a plain score / expert's ratio, which exploded on
    near-chance experts) read the same way as new ones. The floor is the better
    of chance and the majority class on exactly the rows scored (same cap and
    seed); a task counts only where every seed's expert is NORMALIZE_MARGIN or
    more above its floor on both splits, and the tables name those tasks.
    """

    def __init__(self, rows: list[dict], tag: str, data_dir: str | None):
        self.data_dir = data_dir
        # a decoder set's average is already normalised, by umtam eval against each expert (``average``)
        self.applies = all(row.get("avg_is", "score") == "score" for row in rows)
        self.left_out = sorted({task for row in rows for task in row.get("uncounted", [])})
        self.caps = {row["seed"]: row.get("eval_cap", EVAL_CAP) for row in rows}  # the rows each seed scored
        self.floors: dict[tuple[str, str, int], float] = {}
        self.experts = self._expert_scores(rows, tag) if self.applies else {}
        tasks = list(rows[0]["holdout"]) if self.applies else []
        seeds = sorted({row["seed"] for row in rows})
        self.tasks = [t for t in tasks if all(self.gain(t, split, seed) is not None
                                              for split in ("dev", "holdout") for seed in seeds)]

    @staticmethod
    def _expert_scores(rows: list[dict], tag: str) -> dict[tuple[str, str, int], float]:
        """(task, split, seed) -> the expert's score, from the experts' result files."""
        scores = {}
        for row in rows:
            for path in row["experts"]:
                # rows written before checkpoints carried model and seed name the bare expert
                name = Path(path).name
                result = next((p for p in (EXPERT_RESULTS / f"{name}.json",
                                           EXPERT_RESULTS / f"{tag}-s{row['seed']}-{name}.json") if p.exists()), None)
                if result is not None:
                    record = json.loads(result.read_text())
                    for split in ("dev", "holdout"):
                        scores[(record["task"], split, row["seed"])] = record[f"{split}_score"]
        return scores

    def floor(self, task: str, split: str, seed: int) -> float:
        from umtam.evaluate import no_skill_floor, scored_rows

        key = (task, split, seed)
        if key not in self.floors:
            rows = scored_rows(task, data_dir=self.data_dir, max_eval_samples=self.caps[seed], seed=seed,
                               holdout_fraction=HOLDOUT if split == "holdout" else 0.0)
            self.floors[key] = no_skill_floor(task, rows)
        return self.floors[key]

    def gain(self, task: str, split: str, seed: int) -> float | None:
        from umtam.evaluate import NORMALIZE_MARGIN

        expert = self.experts.get((task, split, seed))
        if expert is None:
            return None
        gain = expert - self.floor(task, split, seed)
        return gain if gain >= NORMALIZE_MARGIN else None

    def average(self, row: dict, split: str) -> float | None:
        """The mean normalised score over the counted tasks, None when no task counts."""
        if not self.tasks:
            return None
        seed = row["seed"]
        return mean((row[split][t]["score"] - self.floor(t, split, seed)) / self.gain(t, split, seed)
                    for t in self.tasks)

    def cell(self, runs: list[dict], split: str) -> str:
        if any(r[split] is None for r in runs):  # dev not scored at this setting (dev_at: chosen)
            return "-"
        values = [self.average(r, split) for r in runs]
        return "n/a" if None in values else spread(values, percent=True)

    def beside(self, runs: list[dict], split: str) -> str:
        """' (41.2%)' after a raw average; nothing after a decoder set's, which is normalised already."""
        return f" ({self.cell(runs, split)})" if self.applies else ""

    def note(self) -> str:
        from umtam.evaluate import NORMALIZE_MARGIN

        if not self.applies:
            return (f"avg: the mean over the tasks of umtam eval's normalised score (choice accuracy: (score - "
                    f"floor) / (expert - floor); text: the expert's perplexity / the merge's), a share of what "
                    f"the experts reach; left out, their expert under {100 * NORMALIZE_MARGIN:.0f} points above its "
                    f"floor: {', '.join(self.left_out) or 'none'}")
        counted = ", ".join(self.tasks) or "none"
        return (f"normalised: (score - floor) / (expert - floor), floor = the better of chance and the majority "
                f"class on the rows scored, over the tasks whose expert is >= {100 * NORMALIZE_MARGIN:.0f} points "
                f"above it in every seed: {counted}")


EXPERT_RESULTS = Path("bench/results/experts")


def report(name: str, tag: str, seeds: tuple[int, ...], data_dir: str | None = None) -> str:
    by_label = settings(name, tag, seeds)
    rows = [row for by_seed in by_label.values() for row in by_seed.values()]
    tasks = list(rows[0]["holdout"])
    norm = Normaliser(rows, tag, data_dir)
    kind = "(norm)" if norm.applies else "(normalised)"
    header = (f"| setting | holdout avg {kind} | dev avg {kind} | " + " | ".join(f"dev {t}" for t in tasks)
              + " | seeds |")
    lines = [header, "|" + "---|" * (4 + len(tasks))]
    for setting, by_seed in sorted(by_label.items(), key=lambda item: -mean(r["holdout_avg"] for r in item[1].values())):
        runs = list(by_seed.values())
        per_task = " | ".join(dev_cell(runs, t) for t in tasks)
        lines.append(f"| {setting} | {avg_cell(runs, 'holdout_avg')}{norm.beside(runs, 'holdout')} "
                     f"| {avg_cell(runs, 'dev_avg')}{norm.beside(runs, 'dev')} "
                     f"| {per_task} | {', '.join(map(str, by_seed))} |")
    return "\n".join(lines + ["", norm.note()])


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


def on_chosen(entries, results_name: str, tag: str, seed: int) -> list[tuple[str, dict]]:
    """Each entry's options laid over its method's holdout-chosen setting in another result set."""
    rows = load_rows(results_name, tag, seed)
    out = []
    for method, options in entries:
        stage = [r for r in rows if r["method"] == method]
        if not stage:  # its defaults would stand in for a choice never made
            raise SystemExit(f"merges.py: {results_name!r} has no {method} result for model {tag!r}, seed {seed}; "
                             f"run that sweep first")
        chosen = max(stage, key=lambda r: r["holdout_avg"])["options"]
        out.append((method, {**chosen, **options}))
    return out


def load_sweep(path: str) -> dict:
    """The sweep recipe through umtam's loader (unknown keys, types), every grid point's options checked."""
    from typing import Any, Literal

    from umtam.config import Schema, build_config, load_recipe, option
    from umtam.merge import get_method

    class MergeSweep(Schema):
        name: str = option(help="Results subfolder under bench/results/merges/.")
        experts: list[str] = option(help="Experts, named as bench/experts.py names them without model and seed.")
        runs_dir: str = option("runs/experts", help="Where the experts' checkpoints are.")
        grid: dict[str, Any] = option(help="method -> {option: value or [values]} (or a list of such).")
        refine: dict[str, list[Any]] = option(default_factory=dict, help="option -> values swept next "
                                                                          "around each method's holdout-best.")
        chosen_from: str | None = option(None, help="Start each entry from its method's choice in this set.")
        eval_cap: int = option(EVAL_CAP, ge=1, help="Rows (or text blocks) scored per task and split.")
        dev_at: Literal["every", "chosen"] = option("every", help="Score dev at every setting (the best-on-dev "
                                                                "check possible) or only at each method's "
                                                                "holdout choice (decoders: eval is most of the cost).")

    sweep = build_config(MergeSweep, load_recipe(path), source=str(path)).model_dump()
    for method, options in expand_grid(sweep["grid"]):
        get_method(method).resolve_options(options)  # unknown methods, names and bad values raise
    return sweep


def refine_entries(name: str, tag: str, seed: int, grid: dict, refine: dict) -> list[tuple[str, dict]]:
    """Each refined option's values around the method's holdout-best stage-one setting."""
    rows = load_rows(name, tag, seed)
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


WIDEN_FACTOR = 1.5  # each widening step multiplies (or divides) lambda by this
LAMBDA_RANGE = (0.05, 8.0)  # and stops outside this range
DENSITY_RANGE = (0.01, 0.99)  # keep (1 - drop) halves its distance to 0 or to 1 per step, within this


def _widen_lambda(value: float, up: bool) -> float | None:
    new = round(value * WIDEN_FACTOR if up else value / WIDEN_FACTOR, 3)
    return new if LAMBDA_RANGE[0] <= new <= LAMBDA_RANGE[1] else None


def _widen_keep(value: float, up: bool) -> float | None:
    """Halfway to keeping everything (up) or half as many (down): densities crowd near 0 and 1."""
    new = round(1 - (1 - value) / 2 if up else value / 2, 4)
    return new if new != value and DENSITY_RANGE[0] <= new <= DENSITY_RANGE[1] else None


def _widen_drop(value: float, up: bool) -> float | None:
    keep = _widen_keep(round(1 - value, 4), not up)
    return None if keep is None else round(1 - keep, 4)


# How each swept option is pushed past the edge of what was tried: value, upward -> next value or None.
WIDENINGS = {"lambda": _widen_lambda, "keep": _widen_keep, "drop": _widen_drop}


def widening_entries(name: str, tag: str, seed: int, grid: dict) -> list[tuple[str, dict]]:
    """One value further out for each option (lambda, keep, drop) whose holdout-best is the edge of those tried.

    The edge is that of every value the method tried (as the report marks
    it), the new point keeps the best's other options (its lambda, say);
    lambda widens upward from a single tried value (its default), keep and
    drop only where several were swept. Run until it returns nothing: no
    method's choice then sits on its grid's edge (or on WIDENINGS' limits,
    which the report marks).
    """
    from umtam.merge import get_method

    rows = load_rows(name, tag, seed)
    entries = []
    for method in grid:
        stage = [r for r in rows if r["method"] == method]
        if not stage:
            continue
        defaults = get_method(method).resolve_options({})
        best = max(stage, key=lambda r: r["holdout_avg"])["options"]
        for key in WIDENINGS.keys() & set(_method_options(method)):
            tried = sorted({r["options"].get(key, defaults[key]) for r in stage})
            value = best.get(key, defaults[key])
            others = {k: v for k, v in best.items() if k != key}
            if len(tried) < 2 and key != "lambda":
                continue
            if value == tried[-1]:
                new = WIDENINGS[key](value, True)
            elif value == tried[0]:
                new = WIDENINGS[key](value, False)
            else:
                continue
            if new is not None:
                entries.append((method, {**others, key: new}))
    return entries


def _method_options(method: str):
    from umtam.merge import get_method

    return [info.key for info in get_method(method).options.options().values()]


def run_entries(experts: list[Path], entries, out: Path, seed: int, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for method, options in entries:
        path = out / f"{label(method, options)}.json"
        if path.exists():
            check_same_experts(path, experts)
            continue
        row = merge_and_score(experts, method, options, seed, args, dev=args.dev_at == "every")
        path.write_text(json.dumps(row, indent=1) + "\n")
        dev = "" if row["dev_avg"] is None else f" dev {row['dev_avg']:.4f}"
        print(f"{label(method, options)}: holdout {row['holdout_avg']:.4f}{dev}", flush=True)


def check_same_experts(path: Path, experts: list[Path]) -> None:
    """Refuse to resume onto a result of other experts (a recipe's experts edited under the same name)."""
    stored = [Path(e).name for e in json.loads(path.read_text())["experts"]]
    # results written before checkpoint names carried model and seed name the bare expert
    names = [Path(e).name for e in experts]
    if len(names) != len(stored) or not all(now == then or now.endswith(f"-{then}") for now, then in zip(names, stored)):
        raise SystemExit(f"merges.py: {path} merged {', '.join(stored)}, not this recipe's "
                         f"experts; give the recipe another name or remove that folder")


def load_rows(name: str, tag: str, seed: int) -> list[dict]:
    """The rows of one seed, a decoder set's averages counted alike (``settings``: over every seed's)."""
    return recount_decoder_averages(stored_rows(name, tag, seed))


def stored_rows(name: str, tag: str, seed: int) -> list[dict]:
    """The rows of one seed as written; rows written before results carried their seed get their folder's."""
    rows = [json.loads(p.read_text()) for p in sorted(results_dir(name, tag, seed).glob("*.json"))]
    return [{"seed": seed, **row} for row in rows]


def recount_decoder_averages(rows: list[dict]) -> list[dict]:
    """A decoder set's averages over the tasks counted in every row and split scored (GLUE rows as they are).

    umtam eval leaves a task out of one split's normalised average where its
    expert is within NORMALIZE_MARGIN of the floor on that split's rows; an
    expert clear of it on dev but not on the holdout would put the task in the
    dev average and not in the average the setting was chosen by. Counting is
    a property of the experts alone, not of any merge's score.
    """
    if not rows or any(row.get("avg_is") != "normalized" for row in rows):
        return rows
    scored = [row[split] for row in rows for split in ("holdout", "dev") if row.get(split)]
    counted = [task for task in scored[0] if all(results[task]["normalized"] is not None for results in scored)]
    if not counted:
        raise SystemExit(f"merges.py: no task of {', '.join(scored[0])} has a normalised score on every split")

    def recounted(results: dict | None) -> float | None:
        return None if results is None else mean(results[task]["normalized"] for task in counted)

    return [{**row, "holdout_avg": recounted(row["holdout"]), "dev_avg": recounted(row.get("dev")),
             "uncounted": sorted(set(scored[0]) - set(counted))} for row in rows]


def all_rows(name: str, tag: str, seeds: tuple[int, ...]) -> list[dict]:
    """Every row of the seeds asked for (each carries its seed); a seed without any result is refused."""
    return [row for by_seed in settings(name, tag, seeds).values() for row in by_seed.values()]


def seed_choices(rows: list[dict], seeds: tuple[int, ...], method: str, key: str) -> dict[int, dict]:
    """seed -> that seed's row of ``method`` with the best ``key`` (holdout_avg, or dev_avg where scored).

    Each seed chooses on its own holdout, as each seed's sweep refined and widened around its own
    best: a setting only one seed reached is never compared, as a mean, with settings all seeds ran.
    """
    choices = {}
    for seed in seeds:
        candidates = [row for row in rows if row["seed"] == seed and row["method"] == method and row[key] is not None]
        if candidates:
            choices[seed] = max(candidates, key=lambda row: row[key])
    return choices


def chosen_table(name: str, tag: str, seeds: tuple[int, ...], data_dir: str | None = None) -> str:
    """Per method: each seed's holdout-chosen setting and its dev scores, mean +- std over the seeds; then
    each seed's best on dev, labelled (an oracle).

    A chosen value that is the smallest or largest of its option's values
    swept for that method is marked "(edge)": the grid may cut the optimum off.
    """
    rows = all_rows(name, tag, seeds)
    tasks = list(rows[0]["holdout"])
    norm = Normaliser(rows, tag, data_dir)
    averages = "dev avg | normalised avg" if norm.applies else "dev avg (normalised)"
    lines = ["| method | chosen by | setting | " + " | ".join(tasks) + f" | {averages} | seeds |",
             "|---|---|---|" + "---|" * (len(tasks) + 2 + norm.applies)]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # the best-on-dev check needs dev at every setting (not with dev_at: chosen)
    every_dev = all(row["dev"] is not None for row in rows)
    for by, key in (("holdout", "holdout_avg"), ("dev (oracle)", "dev_avg"))[:2 if every_dev else 1]:
        for method in methods:
            choices = seed_choices(rows, seeds, method, key)
            runs = list(choices.values())
            swept = [row["options"] for row in rows if row["method"] == method]
            lines.append(f"| {method} | {by} | {setting_cell(choices, swept)} | "
                         + " | ".join(dev_cell(runs, t) for t in tasks)
                         + f" | {avg_cell(runs, 'dev_avg')}{' | ' + norm.cell(runs, 'dev') if norm.applies else ''}"
                         + f" | {', '.join(map(str, choices))} |")
    return "\n".join(lines + ["", norm.note()])


def paired_table(name: str, tag: str, seeds: tuple[int, ...], reference: str = "umtam",
                 data_dir: str | None = None) -> str:
    """Each method's holdout-chosen dev average minus ``reference``'s, seed by seed: mean +- std of the
    differences, the spread a difference has to exceed to be called."""
    rows = all_rows(name, tag, seeds)
    norm = Normaliser(rows, tag, data_dir)
    ours = seed_choices(rows, seeds, reference, "holdout_avg")
    if not norm.applies:  # a decoder set: its dev avg is the normalised one, differenced in points of it
        lines = [f"| method | dev avg (normalised) - {reference}'s | seeds |", "|---|---|---|"]
    else:
        lines = [f"| method | dev avg - {reference}'s | normalised avg - {reference}'s | seeds |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        theirs = seed_choices(rows, seeds, method, "holdout_avg")
        paired = [seed for seed in theirs if seed in ours and theirs[seed]["dev"] is not None
                  and ours[seed]["dev"] is not None]
        if method == reference or not paired:
            continue
        raw = [theirs[seed]["dev_avg"] - ours[seed]["dev_avg"] for seed in paired]
        if not norm.applies:
            lines.append(f"| {method} | {spread(raw)} | {', '.join(map(str, paired))} |")
            continue
        normalised = [(norm.average(theirs[seed], "dev"), norm.average(ours[seed], "dev")) for seed in paired]
        norm_cell = ("n/a" if any(None in pair for pair in normalised)
                     else spread([a - b for a, b in normalised], percent=True))
        lines.append(f"| {method} | {spread(raw)} | {norm_cell} | {', '.join(map(str, paired))} |")
    return "\n".join(lines)


def ablation_table(name: str, tag: str, seeds: tuple[int, ...], grid: dict, chosen_from: str,
                   data_dir: str | None = None) -> str:
    """A recipe with ``chosen_from`` (the ablation): one row per grid entry, on the setting each seed's
    ``chosen_from`` set chooses now, dev mean +- std and the paired difference from the first entry (the
    full method). A seed whose choice moved since its ablation ran has no run of the new one: left out."""
    rows = all_rows(name, tag, seeds)
    norm = Normaliser(rows, tag, data_dir)
    entries = expand_grid(grid)
    wanted = {seed: on_chosen(entries, chosen_from, tag, seed) for seed in seeds}

    def runs_of(index: int) -> dict[int, dict]:
        return {row["seed"]: row for row in rows
                if (row["method"], row["options"]) == wanted[row["seed"]][index]}

    full = runs_of(0)
    lines = [f"| variant | dev avg | normalised avg | dev avg - {label(*entries[0])}'s | seeds |", "|---|---|---|---|---|"]
    for index, (method, options) in enumerate(entries):
        runs = runs_of(index)
        paired = [runs[seed]["dev_avg"] - full[seed]["dev_avg"] for seed in runs if seed in full]
        lines.append(f"| {label(method, options)} | {avg_cell(list(runs.values()), 'dev_avg')} "
                     f"| {norm.cell(list(runs.values()), 'dev')} | {spread(paired) if paired else '-'} "
                     f"| {', '.join(map(str, sorted(runs)))} |")
    return "\n".join(lines)


def setting_cell(choices: dict[int, dict], swept: list[dict]) -> str:
    """The chosen options ("-" for none), once if every seed chose the same, else per seed."""
    def shown(options: dict) -> str:
        return ", ".join(f"{k}={v}{' (edge)' if on_edge(k, v, swept) else ''}" for k, v in sorted(options.items())) or "-"

    texts = {seed: shown(row["options"]) for seed, row in choices.items()}
    if len(set(texts.values())) <= 1:
        return next(iter(texts.values()), "-")
    return "; ".join(f"s{seed}: {text}" for seed, text in texts.items())


def on_edge(key: str, value, swept: list[dict]) -> bool:
    """Whether ``value`` is the least or greatest numeric value of ``key`` among several swept.

    Keeping everything (keep 1.0, drop 0.0) is a bound, not an edge: nothing lies past it.
    """
    values = {o[key] for o in swept if isinstance(o.get(key), (int, float)) and not isinstance(o.get(key), bool)}
    at_bound = (key == "keep" and value == 1.0) or (key == "drop" and value == 0.0)
    return len(values) > 1 and value in (min(values), max(values)) and not at_bound


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="sweep recipe (name, experts, grid, refine)")
    parser.add_argument("--experts", help="comma list of experts, named as bench/experts.py names them")
    parser.add_argument("--grid", help="';'-separated method:key=value,... entries")
    parser.add_argument("--name", default="default", help="results subfolder")
    parser.add_argument("--model", help="the experts' model, as bench/experts.py --model [default: all-MiniLM-L6-v2]")
    parser.add_argument("--seeds", default="42", help="comma list of the experts' training seeds")
    parser.add_argument("--profile", metavar="FILE", help="the experts' training profile, as bench/experts.py "
                                                          "--profile (its name is part of their tag)")
    parser.add_argument("--runs-dir", default="runs/experts", help="where the experts' checkpoints are")
    parser.add_argument("--data-dir")
    parser.add_argument("--scratch", default=None, help="where merged checkpoints are written (then deleted)")
    parser.add_argument("--methods", help="comma list: sweep only these of the --config's methods (two processes "
                                          "can split a sweep; results share its folder)")
    parser.add_argument("--wait", type=float, default=0, metavar="MINUTES",
                        help="wait up to MINUTES for expert checkpoints another process is still training")
    parser.add_argument("--report", nargs="?", const=True, metavar="NAME",
                        help="only print the tables of an existing result set (NAME, or the --config's)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from experts import load_profile, named_subset, tag_of

    tag, seeds = tag_of(args.model, load_profile(args.profile)), tuple(int(seed) for seed in args.seeds.split(","))
    sweep = load_sweep(args.config) if args.config else None
    if sweep and not args.report:
        sweep = {**sweep, "grid": named_subset(sweep["grid"], args.methods, "merges.py: --methods", "the recipe's grid")}
    name = sweep["name"] if sweep else args.name
    if args.report:
        name = name if args.report is True else args.report
        if sweep and sweep.get("chosen_from"):
            print(ablation_table(name, tag, seeds, sweep["grid"], sweep["chosen_from"], args.data_dir))
            return 0
        print(report(name, tag, seeds, args.data_dir) + "\n\n" + chosen_table(name, tag, seeds, args.data_dir)
              + "\n\n" + paired_table(name, tag, seeds, data_dir=args.data_dir))
        return 0
    args.eval_cap = sweep["eval_cap"] if sweep else EVAL_CAP
    args.dev_at = sweep["dev_at"] if sweep else "every"
    for seed in seeds:
        out = results_dir(name, tag, seed)
        experts = (expert_paths(sweep["experts"], sweep["runs_dir"], tag, seed) if sweep
                   else expert_paths(args.experts.split(","), args.runs_dir, tag, seed))
        if args.wait:
            wait_for_experts(experts, args.wait)
        if sweep:
            entries = expand_grid(sweep["grid"])
            if sweep.get("chosen_from"):  # settings chosen once, on another sweep's holdout scores
                entries = on_chosen(entries, sweep["chosen_from"], tag, seed)
            run_entries(experts, entries, out, seed, args)
            run_entries(experts, refine_entries(name, tag, seed, sweep["grid"], sweep["refine"]), out, seed, args)
            # settings chosen elsewhere (the ablation) are not searched further here
            while not sweep.get("chosen_from") and (entries := widening_entries(name, tag, seed, sweep["grid"])):
                run_entries(experts, entries, out, seed, args)
        else:
            run_entries(experts, [parse_entry(entry) for entry in args.grid.split(";")], out, seed, args)
    if sweep and args.dev_at == "chosen":
        score_chosen_on_dev(name, tag, seeds, lambda seed: expert_paths(sweep["experts"], sweep["runs_dir"], tag, seed),
                            args, methods=set(sweep["grid"]))
    print(report(name, tag, seeds, args.data_dir) + "\n\n" + chosen_table(name, tag, seeds, args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
