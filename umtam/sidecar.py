"""The sidecar (umtam.json) as a typed model: what train, prune and merge write and every reader reads.

One ``Sidecar`` type serves the four writers (train, prune, merge, and the
in-memory record of a plain Hugging Face input) and every reader (inspect,
prune, merge, eval). Reading trusts nothing: ``read_sidecar`` caps the size,
parses the JSON, checks ``schema_version`` first (a newer one may mean other
fields) and then validates every field a reader uses; the first problem
becomes a CheckpointError naming the file and the field. Counts are bounded
to int64 and the floats a reader formats must be finite; a task must be a
registered one (umtam.tasks) with that task's label count. Unknown fields are
kept (a newer writer of the same schema version may add some), so reading
and writing again preserves them.

Written with ``as_json()``: only the fields the writer set, so the file says
what was recorded and nothing more (tests/golden/umtam.*.json pin each kind).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, field_validator, model_validator

from umtam.errors import CheckpointError, first_line
from umtam.registry import unknown_choice_message
from umtam.tasks import TASKS, is_language_key, language_task_key, normalise_task_name, task_names

SIDECAR_FILE = "umtam.json"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded weights: the index, and the shards it names
SCHEMA_VERSION = 1
KINDS = ("train", "prune", "merge")
PLAIN_FORMAT = "huggingface"  # the made-up record of a plain Hugging Face merge input
REQUIRED_FIELDS = ("schema_version", "kind", "tasks", "base_model", "files")
# A sidecar is metadata: megabytes at most (a long loss curve). Anything far larger is
# not one, and is refused before it is read into memory.
MAX_SIDECAR_BYTES = 64 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_plain_file_name(name: Any) -> bool:
    """A bare, printable file name: no separators, no parent references, nothing absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and name.isprintable())  # no NUL, and no newline to break a one-line error message


def _metrics(value: Any) -> Any:
    """{metric: number} or {split: {metric: number}}; null anywhere means "not measured".

    NaN is a number here (a correlation of diverged predictions is recorded as
    NaN, metrics.spearman); infinities and integers past int64 are not scores.
    """
    def number(item: Any) -> bool:
        if isinstance(item, float):
            return not math.isinf(item)
        return item is None or (isinstance(item, int) and not isinstance(item, bool) and abs(item) <= INT64_MAX)

    if value is None or (isinstance(value, dict) and all(
            number(item) or (isinstance(item, dict) and all(number(inner) for inner in item.values()))
            for item in value.values())):
        return value
    raise ValueError("must be an object of numbers (or of such objects per split); NaN is allowed, infinities "
                     "and integers past int64 are not")


Metrics = Annotated[Any, PlainValidator(_metrics)]
# Readers format, sum and convert these: bounded to int64 (what torch and numpy hold) and
# finite floats, so that 10**400 bytes or an Infinity time per step is refused on reading
# instead of overflowing in a renderer.
INT64_MAX = 2**63 - 1
Count = Annotated[int, Field(ge=0, le=INT64_MAX)]
# Seeds go to torch.manual_seed, which takes int64 and uint64 values (base_model reseeds with init_seed).
Seed = Annotated[int, Field(ge=-INT64_MAX - 1, le=2**64 - 1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Record(BaseModel):
    """A part of the sidecar: strict types, unknown fields kept."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_unset=True)


class TaskRecord(Record):
    """One task: its labels and what it scored (a merge or prune keeps its expert's scores as expert_*)."""

    label_names: list[str]
    is_regression: bool = False
    metrics: Metrics = None
    holdout_metrics: Metrics = None
    expert_metrics: Metrics = None
    expert_holdout_metrics: Metrics = None
    data_source: str | None = None

    @model_validator(mode="after")
    def _extra_metrics(self) -> "TaskRecord":
        # (the label count is the task's to check: Sidecar._registered_tasks; a language task has none)
        for key, value in (self.model_extra or {}).items():
            if key.endswith("metrics"):
                _metrics(value)
        return self

    def unevaluated(self) -> "TaskRecord":
        """The task as a merged or pruned model has it: not evaluated yet, its expert's scores kept.

        ``metrics`` becomes ``expert_metrics`` and ``holdout_metrics``
        ``expert_holdout_metrics`` (the normalisers of later scores), unless the
        record already has them: a merged or pruned input keeps the original
        expert's. ``metrics`` is left empty for ``umtam eval``.
        """
        fields = self.as_json()
        unevaluated: dict[str, Any] = {}
        for key, value in fields.items():
            if key.startswith("expert_") or not key.endswith("metrics"):
                unevaluated[key] = value
            elif f"expert_{key}" not in fields:
                unevaluated[f"expert_{key}"] = value
        unevaluated["metrics"] = {}
        unevaluated.setdefault("expert_metrics", {})
        return TaskRecord.model_validate(unevaluated)


class BaseRecord(Record):
    """The weights fine-tuning started from: where they were found and the sha256 of their tensors."""

    fingerprint: str | None  # None only for a plain Hugging Face input, which records no base
    reference: str | None = None
    location: str | None = None
    origin: str | None = None
    init_seed: Seed = 0
    # which model class holds the weights (umtam.models); absent in sidecars before decoders: a classifier
    architecture: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    from_config: bool = False  # a run from scratch: the base is config.json initialised from init_seed


class FileRecord(Record):
    sha256: Annotated[str, Field(pattern=_HEX64.pattern)]
    bytes: Count = 0


class OptimizerRecord(Record):
    name: str
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    state_bytes: Count | None = None


class LineageInput(Record):
    path: str | None = None
    sha256: str | None = None
    tasks: list[str] = Field(default_factory=list)


class Lineage(Record):
    """Where a checkpoint came from: inputs, and a merge's method name or a prune's options."""

    inputs: list[LineageInput] = Field(default_factory=list)
    method: str | dict[str, Any] | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class TrainingRecord(Record):
    config: dict[str, Any]
    final_loss: Finite  # a NaN or inf loss stops training: a finished run records finite ones
    loss_curve: list[Finite]


class StatsRecord(Record):
    beta2: Annotated[float, Field(ge=0, lt=1)]
    bias_corrected: bool
    tracked_steps: Count


class Sidecar(Record):
    schema_version: int
    kind: Literal["train", "prune", "merge"]
    tasks: dict[str, TaskRecord]
    base_model: BaseRecord
    files: dict[str, FileRecord]
    umtam_version: str | None = None
    format: str | None = None
    steps: Count | None = None
    seed: Seed | None = None
    peak_rss_bytes: Count | None = None
    peak_gpu_bytes: Count | None = None
    seconds_per_step: Annotated[Finite, Field(ge=0)] | None = None
    optimizer: OptimizerRecord | None = None
    training: TrainingRecord | None = None
    stats: StatsRecord | None = None
    lineage: Lineage | None = None

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks: dict[str, TaskRecord]) -> dict[str, TaskRecord]:
        if not tasks:
            raise ValueError("must be a non-empty object of task records")
        for name in tasks:
            # Merged heads live under heads/<task>/<key>: a task name cannot hold a '/'.
            if not name or "/" in name or not name.isprintable():
                raise ValueError(f"task name {name!r} must be non-empty and printable, without '/'")
        return tasks

    @model_validator(mode="after")
    def _registered_tasks(self) -> "Sidecar":
        for name, record in self.tasks.items():
            _check_registered(name, record)
        return self

    @field_validator("files", mode="before")
    @classmethod
    def _file_names(cls, files: Any) -> Any:
        # Before the records themselves: a name pointing outside is the problem to report.
        if not isinstance(files, dict):
            return files
        for name in files:
            if not is_plain_file_name(name):
                raise ValueError(f"file entry {_short(name)} points outside the checkpoint directory "
                                 "(a sidecar may only name files inside its own directory)")
        if MODEL_FILE not in files and INDEX_FILE not in files:
            raise ValueError(f"must list {MODEL_FILE} (or, for sharded weights, {INDEX_FILE})")
        return files

    @model_validator(mode="after")
    def _base_recorded(self) -> "Sidecar":
        if self.base_model.fingerprint is None and self.format != PLAIN_FORMAT:
            raise ValueError("base_model.fingerprint must be a string")
        return self

    def file_sha256(self, name: str = MODEL_FILE) -> str:
        return self.files[name].sha256

    def weights_sha256(self) -> str:
        """The identity of the weights for a lineage: model.safetensors' sha256, or for shards one over theirs.

        Sharded: sha256 of "<file> <sha256>" lines of the index and every
        .safetensors file, in name order, so any changed shard changes it.
        """
        if MODEL_FILE in self.files:
            return self.files[MODEL_FILE].sha256
        import hashlib

        lines = "".join(f"{name} {record.sha256}\n" for name, record in sorted(self.files.items())
                        if name == INDEX_FILE or name.endswith(".safetensors") and name != "stats.safetensors")
        return hashlib.sha256(lines.encode()).hexdigest()


def _check_registered(name: str, record: TaskRecord) -> None:
    """A task is a registered one (eval reads its data and metrics by name), with that task's labels.

    Writers record the registered name ("sst2", not "SST-2") and the task's
    label count; a head of another size would be scored against the wrong labels.
    """
    where = _location(("tasks", name))
    if is_language_key(name):
        if record.label_names or record.is_regression:
            raise ValueError(f"{where}: a language task has no labels (label_names must be empty, "
                             "is_regression false)")
        return
    if name not in task_names("classification"):
        choices = [*task_names("classification"), *(language_task_key(n, "<data>") for n in task_names("language"))]
        raise ValueError(f"{where}: " + unknown_choice_message("task", name, choices,
                                                               match=normalise_task_name(name)))
    spec = TASKS.get(name)
    if record.is_regression != spec.is_regression:
        kind = "a regression" if spec.is_regression else "a classification"
        raise ValueError(f"{where}.is_regression is {str(record.is_regression).lower()} but {name} is {kind} task")
    if not spec.is_regression and len(record.label_names) != spec.num_labels:
        raise ValueError(f"{where}.label_names has {len(record.label_names)} label(s) but task {name} has "
                         f"{spec.num_labels} ({', '.join(spec.label_names)})")


def make_sidecar(fields: Mapping[str, Any], where: str | Path = "sidecar") -> Sidecar:
    """A Sidecar from plain fields (a writer's, or a parsed file's); the first problem is a CheckpointError."""
    try:
        return Sidecar.model_validate(dict(fields))
    except ValidationError as exc:
        raise CheckpointError(f"{where}: {describe_first(exc)}") from None


def describe_first(exc: ValidationError) -> str:
    """The first validation problem as 'tasks.mrpc.label_names must be ..., got ...' (and how many more)."""
    errors = exc.errors()
    first = errors[0]
    where = _location(first["loc"])
    if first["type"] == "missing":
        text = f"{where} is missing"
    elif first["type"] in ("value_error", "assertion_error"):
        message = first_line(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        text = f"{where} {message}" if where else message
    else:
        text = f"{where} {_expected(first)}, got {_short(first['input'])}"
    return text + (f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else "")


_PLAIN_PART = re.compile(r"[A-Za-z0-9_-]+")


def _location(loc: tuple) -> str:
    """('tasks', 'mrpc', 'label_names', 0) -> tasks.mrpc.label_names[0]; odd keys bracketed: files['a b']."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_PART.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


_EXPECTED = {
    "int_type": "must be an integer", "float_type": "must be a number", "string_type": "must be a string",
    "bool_type": "must be true or false", "list_type": "must be a list", "dict_type": "must be an object",
    "model_type": "must be an object", "literal_error": "must be one of " + ", ".join(KINDS),
    "string_pattern_mismatch": "must be 64 lowercase hex digits", "model_attributes_type": "must be an object",
    "finite_number": "must be a finite number",
}
# Bounds, worded from the bound itself (pydantic's ctx): ge=0 reads "non-negative".
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}


def _expected(error: Mapping[str, Any]) -> str:
    if error["type"] in _BOUNDS:
        key, words = _BOUNDS[error["type"]]
        bound = error.get("ctx", {}).get(key)
        return "must be non-negative" if (key, bound) == ("ge", 0) else f"must be {words} {bound}"
    return _EXPECTED.get(error["type"], error["msg"][0].lower() + error["msg"][1:])


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for a one-line message: escaped, and cut when long (it may be garbage)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def read_sidecar(path: Path) -> Sidecar:
    """Read and validate a sidecar file; every problem is a CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"{path}: {size} bytes, too large for a sidecar ({MAX_SIDECAR_BYTES} at most)")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({first_line(exc, 200)})") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON (not UTF-8: {first_line(exc, 200)})") from exc
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{path}: not valid JSON ({first_line(exc, 200)})") from exc
    return validate_sidecar(fields, path)


def validate_sidecar(fields: Any, where: Path) -> Sidecar:
    """A parsed sidecar, checked as read_sidecar checks a file: the version first, then every field."""
    check_version(fields, where)
    return make_sidecar(fields, where)


def check_version(fields: Any, where: Path) -> None:
    """The sidecar is an object with every required field and a schema_version this umtam reads."""
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where}: the sidecar must be a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in fields]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
    version = fields["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: schema_version must be an integer, got {_short(version)}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{where}: schema_version {version} is newer than this umtam understands ({SCHEMA_VERSION})",
            hint="upgrade umtam")
    if version < 1:
        raise CheckpointError(f"{where}: invalid schema_version {version}")


def write_sidecar(path: Path, sidecar: Sidecar) -> None:
    """Write the sidecar as sorted, indented JSON, flushed to disk before returning."""
    import os

    with open(path, "w", encoding="utf-8") as handle:
        json.dump(sidecar.as_json(), handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
