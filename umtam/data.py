"""GLUE tasks: where the data lives and how it parses.

A task is read from the first data directory that holds it, in either the
canonical GLUE TSV layout (``<dir>/MRPC/train.tsv``) or the Hugging Face
parquet layout (``<dir>/mrpc/train.parquet``), detected per task; failing
both, from the hub dataset ``nyu-mll/glue``. Labels always come out as the HF
label ids (``TaskSpec.label_names`` order) or, for STS-B, float scores.

Choices the design left open:

- An explicit ``data_dir`` (else ``UMTAM_DATA_DIR``) is the only directory
  searched; without one, every default location that exists is searched in
  order. Within a directory the TSV layout wins over parquet.
- A task folder must hold every split asked for; a folder with ``dev.tsv``
  but no ``train.tsv`` (QNLI as staged) serves ``need_train=False`` only.
- TSV labels may be the label names ("not_entailment") or the HF ids ("1").
- Blank lines in a TSV are skipped; any other row must have the header's
  number of columns.
- Parquet splits may also be sharded as ``<split>-*.parquet`` (hub snapshots).

What a task is (columns, labels, TSV layout, metrics) is its TaskSpec
(umtam.tasks); tokenization and batching live in ``umtam.batching``.
"""

from __future__ import annotations

import csv
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from umtam.batching import check_positive
from umtam.errors import ConfigError, DataError
from umtam.tasks import Example, TaskSpec, get_task

HUB_DATASET = "nyu-mll/glue"
ENV_DATA_DIR = "UMTAM_DATA_DIR"
DATA_DIR_HINT = "set --data-dir or UMTAM_DATA_DIR"


@dataclass
class TaskData:
    """One task's examples; ``source`` says where they came from (e.g. "tsv:/data/MRPC")."""

    spec: TaskSpec
    train: list[Example]
    eval: dict[str, list[Example]]
    source: str
    holdout: list[Example] = field(default_factory=list)


# ---------------------------------------------------------------- locating data

def resolve_data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Data directories to search, best first.

    An explicit ``data_dir``, else ``$UMTAM_DATA_DIR``, is the only candidate
    and must exist. Otherwise: ``../shared/data/glue`` from the working
    directory and ``shared/data/glue`` beside the repository checkout, those
    that exist (possibly none: the hub is then the only source).
    """
    for given, origin in ((data_dir, "data directory"), (os.environ.get(ENV_DATA_DIR), ENV_DATA_DIR)):
        if given is not None and str(given) != "":
            path = Path(given).expanduser()
            if not path.is_dir():
                raise DataError(f"{origin} {path} does not exist or is not a directory",
                                hint=DATA_DIR_HINT)
            return [path]
    defaults = [Path.cwd().parent / "shared" / "data" / "glue",
                Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"]
    found: list[Path] = []
    for path in defaults:
        if path.is_dir() and path.resolve() not in {p.resolve() for p in found}:
            found.append(path)
    return found


def _tsv_split_files(folder: Path, spec: TaskSpec) -> dict[str, list[Path]]:
    names = dict(zip(spec.eval_splits, spec.tsv.eval_files), train="train.tsv")
    return {split: [folder / name] for split, name in names.items() if (folder / name).is_file()}


def _parquet_split_files(folder: Path, spec: TaskSpec) -> dict[str, list[Path]]:
    found = {}
    for split in ("train", *spec.eval_splits):
        whole = folder / f"{split}.parquet"
        shards = [whole] if whole.is_file() else sorted(folder.glob(f"{split}-*.parquet"))
        if shards:
            found[split] = shards
    return found


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _layouts_under(root: Path, spec: TaskSpec) -> list[tuple]:
    """(kind, folder, find files, read file) for each layout a task may have, preferred first."""
    return [("tsv", root / spec.glue_dir, _tsv_split_files, _read_tsv),
            ("parquet", root / spec.name, _parquet_split_files, _read_parquet)]


def _load_splits(spec: TaskSpec, splits: Sequence[str], data_dir, allow_hub: bool):
    """(source, {split: examples}) from the first place holding every split; DataError if none."""
    tried: list[str] = []
    for root in resolve_data_dirs(data_dir):
        for kind, folder, find, read in _layouts_under(root, spec):
            if not folder.is_dir():
                tried.append(f"{folder} (missing)")
                continue
            files = find(folder, spec)
            missing = [split for split in splits if split not in files]
            if missing:
                tried.append(f"{folder} (no {kind} file for split {', '.join(missing)})")
                continue
            return f"{kind}:{folder}", {s: [ex for p in files[s] for ex in read(p, spec)] for s in splits}
    if not tried:
        tried.append("no local data directory")
    if not allow_hub:
        tried.append("hub (disabled)")
    elif _hub_offline():
        tried.append(f"hub {HUB_DATASET} (offline: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set)")
    else:
        try:
            return f"hub:{HUB_DATASET}", _load_from_hub(spec, splits)
        except DataError:
            raise
        except Exception as exc:  # any hub/network/import failure is "not available here"
            tried.append(f"hub {HUB_DATASET} (offline: {_one_line(exc)})")
    raise DataError(f"no GLUE data for task {spec.name!r}: tried {', '.join(tried)}",
                    hint=DATA_DIR_HINT)


# ---------------------------------------------------------------- parsing

def _parse_label(raw: Any, spec: TaskSpec, where: str) -> int | float:
    """HF label id (or float score) for a raw TSV/parquet label; DataError naming ``where``."""
    if spec.is_regression:
        try:
            score = float(raw)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{where}: score {raw!r} is not a finite number")
        return score
    if isinstance(raw, str) and raw.strip() in spec.label_names:
        return spec.label_names.index(raw.strip())
    try:
        label_id = int(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        label_id = -1
    if 0 <= label_id < spec.num_labels and str(raw).strip() == str(label_id):
        return label_id
    allowed = ", ".join([*spec.label_names, *map(str, range(spec.num_labels))])
    raise DataError(f"{where}: label {raw!r} is not one of {allowed} (task {spec.name})")


def _column_positions(header: list[str], wanted: Sequence[str | int], path: Path) -> list[int]:
    positions = []
    for column in wanted:
        if isinstance(column, int):
            positions.append(column)
        elif column in header:
            positions.append(header.index(column))
        else:
            raise DataError(f"{path}: header has no column {column!r} (columns: {', '.join(header)})")
    return positions


def _read_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    """Parse one canonical GLUE TSV (no quoting: GLUE text contains bare '"')."""
    layout = spec.tsv
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            rows = [(line, row) for line, row in enumerate(reader, 1) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not readable as UTF-8 tab-separated text ({_one_line(exc)})") from exc
    if not rows:
        raise DataError(f"{path} is empty")
    if layout.headerless_width is None:
        header, rows = rows[0][1], rows[1:]
        width = len(header)
        if not rows:
            raise DataError(f"{path} has a header but no data rows")
    else:
        header, width = [], layout.headerless_width
    text_at = _column_positions(header, layout.text_columns, path)
    label_at = _column_positions(header, (layout.label_column,), path)[0]
    examples = []
    for line, row in rows:
        if len(row) != width:
            raise DataError(f"{path}:{line}: expected {width} tab-separated columns, found {len(row)}")
        texts = [row[i] for i in text_at]
        label = _parse_label(row[label_at], spec, f"{path}:{line}")
        examples.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    return examples


def _columns_to_examples(columns: dict[str, list], spec: TaskSpec, where: str) -> list[Example]:
    """Examples from HF-style columns (parquet table or hub dataset)."""
    missing = [name for name in (*spec.text_fields, "label") if name not in columns]
    if missing:
        raise DataError(f"{where}: no column {', '.join(map(repr, missing))} "
                        f"(columns: {', '.join(columns)})")
    if not columns["label"]:
        raise DataError(f"{where} has no rows")
    for name in spec.text_fields:
        _check_text_column(columns[name], name, where)
    texts = [columns[name] for name in spec.text_fields]
    return [Example(texts[0][i], texts[1][i] if len(texts) > 1 else None,
                    _parse_label(_not_null(raw, "label", where, i), spec, f"{where}: row {i}"))
            for i, raw in enumerate(columns["label"])]


def _check_text_column(values: list, name: str, where: str) -> None:
    """Every row's text is a string: the tokenizer fails deep inside on a null or a number."""
    for row, value in enumerate(values):
        if not isinstance(_not_null(value, name, where, row), str):
            raise DataError(f"{where}: row {row}: column {name!r} holds {type(value).__name__} {value!r:.60}, "
                            "not text")


def _not_null(value: Any, name: str, where: str, row: int) -> Any:
    # parquet columns are nullable: a missing value reads as None
    if value is None:
        raise DataError(f"{where}: row {row}: column {name!r} is null")
    return value


def _read_parquet(path: Path, spec: TaskSpec) -> list[Example]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for pyarrow

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from exc
    return _columns_to_examples(table.to_pydict(), spec, str(path))


def _load_from_hub(spec: TaskSpec, splits: Sequence[str]) -> dict[str, list[Example]]:
    from datasets import load_dataset  # lazy: heavy, and only needed without local data

    dataset = load_dataset(HUB_DATASET, spec.name)
    return {split: _columns_to_examples(dataset[split].to_dict(), spec,
                                        f"hub {HUB_DATASET}/{spec.name}/{split}")
            for split in splits}


def subsample(examples: list, limit: int | None, seed: int) -> list:
    """A seeded random ``limit`` of the rows (all when None or more), kept in file order."""
    # File order, so a subset reads like the original data.
    if limit is None or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


# Fixed, not the run's seed: every run of a task holds out the same training rows,
# so settings chosen on them compare like with like across seeds and optimizers.
HOLDOUT_SEED = 17


def split_holdout(examples: list, fraction: float) -> tuple[list, list]:
    """(rest, held out): a fixed random ``fraction`` of the rows, both kept in file order."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"holdout fraction must be in [0, 1), got {fraction}")
    count = int(round(len(examples) * fraction))
    held = set(random.Random(HOLDOUT_SEED).sample(range(len(examples)), count))
    rest = [example for i, example in enumerate(examples) if i not in held]
    return rest, [examples[i] for i in sorted(held)]


def load_task(task: str, *, data_dir: str | Path | None = None,
              max_train_samples: int | None = None, max_eval_samples: int | None = None,
              seed: int = 0, allow_hub: bool = True, need_train: bool = True,
              holdout_fraction: float = 0.0) -> TaskData:
    """Load a GLUE task's train and eval splits (test splits are unlabeled: never loaded).

    ``holdout_fraction`` sets aside a fixed slice of train (before subsampling)
    for choosing hyperparameters without touching dev; it needs the train split
    even when ``need_train`` is False. ``max_*_samples`` keep a seeded random
    subset, in original order. ``need_train=False`` skips the train split.
    """
    spec = get_task(task)
    check_positive("max_train_samples", max_train_samples)
    check_positive("max_eval_samples", max_eval_samples)
    splits = (("train",) if need_train or holdout_fraction else ()) + spec.eval_splits
    source, by_split = _load_splits(spec, splits, data_dir, allow_hub)
    train, holdout = split_holdout(by_split.get("train", []), holdout_fraction)
    return TaskData(spec=spec,
                    train=subsample(train, max_train_samples, seed) if need_train else [],
                    eval={split: subsample(by_split[split], max_eval_samples, seed)
                          for split in spec.eval_splits},
                    source=source,
                    holdout=subsample(holdout, max_eval_samples, seed))
