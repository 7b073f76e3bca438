"""Periodic training states and resuming from them (``umtam train --save-every N`` / ``--resume DIR``).

Layout. States go to ``<output>-state/`` beside the output (or ``--state-dir``),
one directory per saved optimizer step; the newest two are kept, so a state
damaged after it was written still leaves the previous one to resume from::

    runs/mrpc-state/
      step-00000200/
        state.safetensors   every tensor (below), keyed by prefix
        umtam-state.json    the record and marker, written last
      step-00000300/ ...

A state is never mistaken for a checkpoint: it has no ``umtam.json``, so
``umtam.checkpoint.load_checkpoint`` and ``umtam inspect`` refuse it, and it
lives outside the output directory, which is written once, at the end, exactly
as without ``--save-every``. Each step directory is built under a temporary
name (``.step-N.tmp-*``) and renamed into place by umtam.checkpoint's atomic
write helpers; a directory without ``umtam-state.json`` is not a state, and the
temporary leftovers of a killed run are removed when the next run starts.

``state.safetensors`` holds ``model/<key>`` (model.state_dict()),
``optimizer/<param index>/<key>`` (the tensors of optimizer.state_dict()),
``tracker/<param name>/<key>`` (CurvatureTracker.state_dict()), ``rng/torch``
(torch's CPU generator state, uint8) and ``rng/cuda/<device>``.
``umtam-state.json`` holds everything else: ``format`` and ``schema_version``;
``step``, ``epoch`` and ``batch`` (batches of that epoch already trained on;
batch order is a pure function of (seed, epoch), see umtam.batching);
``total_steps`` and the ``loss_curve`` so far; ``config`` (the TrainConfig,
without ``force``); ``optimizer`` (the class name, ``param_groups`` with their
hyperparameters, and any numbers kept in per-parameter state, e.g. Adafactor's
step); ``scheduler`` (LambdaLR.state_dict(); the lambda is rebuilt from the
config); ``tracker`` (beta2); ``rng`` (python ``random`` and numpy states);
``base_fingerprint`` and ``train_digest`` (sha256 of the tokenized training
set), checked on resume so a changed model, tokenizer or data set is refused
rather than silently continued; ``resumed`` (earlier resumes: step, state, lr);
``seconds_per_step``; and ``files`` (sha256 and size of state.safetensors).
No pickles: JSON and safetensors only. Reading trusts neither file: the record
is validated field by field (``StateRecord``, as umtam.sidecar validates a
sidecar), state.safetensors must match its recorded size and sha256, and
whatever does not fit the run being resumed (a tensor of another shape, a
missing key or RNG entry) is one CheckpointError naming the state directory.

One run at a time per state directory: ``StateWriter`` holds an exclusive
lock (flock on ``umtam-train.lock`` in the directory, which names its pid) for
the run's lifetime, and a second run is refused, naming that pid. The lock
file is removed when the writer is closed.

Resuming restores all of it, so on CPU the final weights, statistics and loss
curve equal an uninterrupted run's bit for bit. Options given with
``--resume`` must equal the saved run's, except those TrainConfig marks
resumable (``TrainConfig.resumable_options()``): where files go (output,
state_dir, save_every, force, plot_loss), where the same data and device live
(data_dir, checked by ``train_digest``; device), the evaluation batch size, and
lr, so that a run that diverged can continue from its last good state with a
lower learning rate (the schedule keeps its shape, scaled to the new peak;
such a run is of course no longer bit-identical).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from umtam import __version__
# the temp-dir-then-rename protocol has one implementation, in umtam.atomic
from umtam.atomic import (check_name_fits, check_regular_file, file_records, hash_identified, resolve_path,
                          write_directory, write_json_durably)
from umtam.checkpoint import SIDECAR_FILE, SIZE_SLACK, STATE_MARKER
from umtam.config import build_config
from umtam.config.train import TrainConfig
from umtam.errors import CheckpointError, ConfigError, DivergenceError, UmtamError, first_line
from umtam.safetensors_io import load_tensors, save_tensors
from umtam.sidecar import MAX_SIDECAR_BYTES, describe_first

STATE_FORMAT = "umtam-train-state"
STATE_SCHEMA_VERSION = 1
STATE_TENSORS = "state.safetensors"
KEEP_STATES = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_LEFTOVER = re.compile(r"^\.step-\d+\.(tmp|old)-")
_REQUIRED = ("format", "schema_version", "step", "epoch", "batch", "total_steps", "loss_curve", "config",
             "optimizer", "scheduler", "tracker", "rng", "base_fingerprint", "train_digest", "files")
LOCK_FILE = "umtam-train.lock"
_DAMAGED = "the state was damaged or saved by another model or optimizer; resume from the previous step-N directory"


# ----------------------------------------------------------------------------- the record, validated


class _Part(BaseModel):
    """Strict types (JSON numbers stay numbers), unknown fields allowed: a newer writer may add some."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


Count = Annotated[int, Field(ge=0)]
Scalar = bool | int | float | str | None


class ParamGroupRecord(_Part):
    params: list[Count]


class OptimizerStateRecord(_Part):
    class_name: str = Field(alias="class")
    param_groups: list[ParamGroupRecord]
    numbers: dict[Annotated[str, Field(pattern=r"^[0-9]+$")], dict[str, Scalar]]


class SchedulerRecord(_Part):
    base_lrs: list[float]
    last_epoch: int


class TrackerRecord(_Part):
    beta2: float


class RngRecord(_Part):
    python: tuple[int, list[int], float | None]
    numpy: tuple[str, list[int], int, int, float]
    cuda_devices: Count


class StateFileRecord(_Part):
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: Count


class ResumeRecord(_Part):
    step: Count
    state: str
    lr: float


class EvalPoint(_Part):
    step: Count
    metrics: dict[str, dict[str, float]]  # split -> metric -> value


class StateRecord(_Part):
    """umtam-state.json: every field ``restore`` and the training loop read, with its type."""

    format: str
    schema_version: int
    step: Count
    epoch: Count
    batch: Count
    total_steps: Count
    loss_curve: list[float]
    config: dict[str, Any]
    optimizer: OptimizerStateRecord
    scheduler: SchedulerRecord
    tracker: TrackerRecord
    rng: RngRecord
    base_fingerprint: str
    train_digest: str
    files: dict[str, StateFileRecord]
    resumed: list[ResumeRecord] = Field(default_factory=list)
    seconds_per_step: float | None = None
    eval_curve: list[EvalPoint] = Field(default_factory=list)  # --eval-every's scores so far (older states: none)

    @model_validator(mode="after")
    def _consistent(self) -> "StateRecord":
        if STATE_TENSORS not in self.files:
            raise ValueError(f"files must list {STATE_TENSORS}")
        if len(self.loss_curve) != self.step:
            raise ValueError(f"loss_curve has {len(self.loss_curve)} entries for step {self.step}")
        if self.step > self.total_steps:
            raise ValueError(f"step {self.step} is past total_steps {self.total_steps}")
        return self


# ----------------------------------------------------------------------------- what a run is


@dataclass
class Position:
    """Where a run stands: optimizer steps done, the epoch, and batches of that epoch already used."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    loss_curve: list[float] = field(default_factory=list)
    eval_curve: list[dict[str, Any]] = field(default_factory=list)  # {"step", "metrics": {split: metrics}}

    def advance(self, loss: float) -> None:
        self.step += 1
        self.batch += 1
        self.loss_curve.append(loss)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batch = 0


@dataclass
class RunIdentity:
    """What a state must share with the run that resumes it, beyond the config."""

    base_fingerprint: str
    train_digest: str
    total_steps: int


@dataclass
class Trainables:
    """The objects whose state a training state captures."""

    model: Any
    optimizer: Any
    tracker: Any
    scheduler: Any
    scaler: Any = None  # fp16's torch.amp.GradScaler (umtam.precision), else None


@dataclass
class TrainingState:
    """A complete state directory and its JSON record (tensors are read by ``restore``)."""

    path: Path
    record: dict[str, Any]

    @property
    def step(self) -> int:
        return self.record["step"]

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]


def features_digest(features: Sequence[Mapping[str, Any]]) -> str:
    """sha256 of the tokenized training set: a resume must see the same examples, tokens and labels."""
    digest = hashlib.sha256()
    for feature in features:
        for key in sorted(feature):
            digest.update(f"{key}={feature[key]!r};".encode())
        digest.update(b"\n")
    return digest.hexdigest()


def default_state_dir(output: str | Path) -> Path:
    """``<output>-state`` beside the output, so the output directory itself is written only once."""
    out = Path(output)
    if out.name in ("", ".", ".."):
        out = out.resolve()
    return out.with_name(f"{out.name}-state")


def state_dir_for(config: TrainConfig) -> Path:
    return Path(config.state_dir) if config.state_dir else default_state_dir(config.output)


# ----------------------------------------------------------------------------- finding and checking states


def find_state(path: str | Path) -> TrainingState:
    """The state at ``path``: a step directory itself, or the newest complete one in a state directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such training-state directory")
    if (directory / STATE_MARKER).is_file():
        return read_state(directory)
    if (directory / SIDECAR_FILE).is_file():
        raise CheckpointError(f"{directory}: a finished checkpoint, not a training state",
                              hint="--resume takes the directory --save-every writes, OUTPUT-state/ by default")
    steps = complete_states(directory)
    if not steps:
        raise CheckpointError(f"{directory}: no complete training state (no step-N/{STATE_MARKER})",
                              hint="states are written by umtam train --save-every N")
    return read_state(steps[-1])


def complete_states(directory: Path) -> list[Path]:
    """Step directories holding a marker, oldest first (the marker is written last, so these are whole)."""
    if not directory.is_dir():
        return []
    found = [(int(match.group(1)), path) for path in directory.iterdir()
             if (match := _STEP_DIR.match(path.name)) and (path / STATE_MARKER).is_file()]
    return [path for _, path in sorted(found)]


def read_state(directory: Path) -> TrainingState:
    """The state in ``directory``, its record validated (``StateRecord``); every problem names the file."""
    marker = directory / STATE_MARKER
    try:
        size = check_regular_file(marker).st_size
        if size > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"{marker}: {size} bytes, too large for a training-state record")
        text = marker.read_text(encoding="utf-8")
        record = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{marker}: not a readable training-state record ({first_line(exc)})") from exc
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{marker}: not a umtam training state (format is not {STATE_FORMAT!r})")
    if record.get("schema_version") != STATE_SCHEMA_VERSION:
        raise CheckpointError(f"{marker}: schema_version {record.get('schema_version')!r} is not "
                              f"{STATE_SCHEMA_VERSION}", hint="resume with the umtam version that wrote it")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise CheckpointError(f"{marker}: missing field(s) {', '.join(missing)}")
    try:
        StateRecord.model_validate_json(text)  # strict JSON types; ``record`` keeps the values as written
    except ValidationError as exc:
        raise CheckpointError(f"{marker}: {describe_first(exc)}", hint=_DAMAGED) from None
    return TrainingState(directory, record)


def config_for_resume(path: str | Path, *layers: Mapping[str, Any],
                      flags: Mapping[str, Any] | None = None) -> TrainConfig:
    """The saved run's TrainConfig with ``layers`` (recipes) and ``flags`` on top; conflicting values are refused."""
    state = find_state(path)
    config = build_config(TrainConfig, state.config, *layers, flags=flags, source=f"options for --resume {path}")
    check_resumable(state, config)
    return config


def check_resumable(state: TrainingState, config: TrainConfig) -> None:
    """ConfigError naming every option of ``config`` that differs from the saved run (bar the resumable ones)."""
    given = config.model_dump()
    resumable = TrainConfig.resumable_options()
    conflicts = [f"{key}={given.get(key)!r} (saved run: {saved!r})" for key, saved in sorted(state.config.items())
                 if key not in resumable and given.get(key) != saved]
    if conflicts:
        raise ConfigError(f"--resume {state.path}: options differ from the saved run: " + "; ".join(conflicts),
                          hint=f"only {', '.join(resumable)} may change on resume; drop the others")


def check_same_run(state: TrainingState, identity: RunIdentity) -> None:
    """Refuse a state whose base weights, training data or step plan differ from this run's."""
    record = state.record
    if record["base_fingerprint"] != identity.base_fingerprint:
        raise CheckpointError(f"{state.path}: the base model's weights differ from the saved run's",
                              hint="resume with the model the run started from")
    if record["train_digest"] != identity.train_digest:
        raise CheckpointError(f"{state.path}: the tokenized training data differ from the saved run's",
                              hint="resume with the same data files and tokenizer")
    if record["total_steps"] != identity.total_steps:
        raise CheckpointError(f"{state.path}: the run planned {record['total_steps']} steps, this one "
                              f"{identity.total_steps}")


# ----------------------------------------------------------------------------- capture and restore


def capture(parts: Trainables, position: Position) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON record, tensors) of everything that determines the rest of the run."""
    tensors = {f"model/{key}": value for key, value in parts.model.state_dict().items()}
    optimizer_record, optimizer_tensors = split_optimizer_state(parts.optimizer.state_dict())
    tracker_state = parts.tracker.state_dict()
    for name, entries in tracker_state["state"].items():
        tensors.update({f"tracker/{name}/{key}": value for key, value in entries.items()})
    rng_record, rng_tensors = capture_rng()
    record = {
        "step": position.step, "epoch": position.epoch, "batch": position.batch,
        "loss_curve": list(position.loss_curve),
        **({"eval_curve": list(position.eval_curve)} if position.eval_curve else {}),
        "optimizer": {"class": type(parts.optimizer).__name__, **optimizer_record},
        "scheduler": parts.scheduler.state_dict(),
        "tracker": {"beta2": tracker_state["beta2"]},
        "rng": rng_record,
    }
    if parts.scaler is not None:  # its scale and growth counter: plain numbers
        record["scaler"] = parts.scaler.state_dict()
    return record, {**tensors, **optimizer_tensors, **rng_tensors}


def restore(state: TrainingState, parts: Trainables, *, lr: float) -> Position:
    """Load a state into freshly built trainables and return where the run stands.

    The RNG goes last: building the model and reading files must not disturb
    the stream the next dropout mask draws from.
    """
    record = state.record
    tensors = load_state_tensors(state)
    if record["optimizer"]["class"] != type(parts.optimizer).__name__:
        raise CheckpointError(f"{state.path}: saved by {record['optimizer']['class']}, "
                              f"this run builds {type(parts.optimizer).__name__}")
    check_state_tensors(state, tensors, parts.model)
    try:
        _load_into(record, tensors, parts, lr)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        # torch's and the tracker's refusals of a state that does not fit, said in one line
        raise CheckpointError(f"{state.path}: cannot be restored into this run ({_one_line(exc)})",
                              hint=_DAMAGED) from exc
    return Position(record["step"], record["epoch"], record["batch"], list(record["loss_curve"]),
                    [dict(point) for point in record.get("eval_curve", [])])


def _load_into(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], parts: Trainables,
               lr: float) -> None:
    parts.model.load_state_dict(_with_prefix(tensors, "model/"), strict=True)
    parts.optimizer.load_state_dict(join_optimizer_state(record["optimizer"], _with_prefix(tensors, "optimizer/")))
    parts.tracker.load_state_dict({"beta2": record["tracker"]["beta2"],
                                   "state": _nest(_with_prefix(tensors, "tracker/"))})
    parts.scheduler.load_state_dict(dict(record["scheduler"]))
    if parts.scaler is not None:
        if "scaler" not in record:
            raise KeyError("the state has no loss-scaler record, which an fp16 run needs")
        parts.scaler.load_state_dict(dict(record["scaler"]))
    if parts.scheduler.base_lrs != [lr] * len(parts.scheduler.base_lrs):
        rescale_peak_lr(parts.optimizer, parts.scheduler, lr)
    restore_rng(record["rng"], _with_prefix(tensors, "rng/"))


def _one_line(exc: BaseException) -> str:
    """torch puts the useful part of load_state_dict's message on its second line; keep both, on one."""
    lines = [line.strip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    return " ".join(lines[:2])[:240]


def check_state_tensors(state: TrainingState, tensors: Mapping[str, torch.Tensor], model) -> None:
    """The saved model tensors have the model's keys and shapes, and the RNG entries restore_rng reads exist."""
    path = state.path / STATE_TENSORS
    saved = _with_prefix(tensors, "model/")
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    if missing:
        raise CheckpointError(f"{path}: no tensor model/{missing[0]} ({len(missing)} of the model's missing)",
                              hint=_DAMAGED)
    if unexpected:
        raise CheckpointError(f"{path}: tensor model/{unexpected[0]} is not in this run's model", hint=_DAMAGED)
    for key, shape in expected.items():
        if tuple(saved[key].shape) != shape:
            raise CheckpointError(f"{path}: tensor model/{key} has shape {list(saved[key].shape)}, this run's "
                                  f"model {list(shape)}", hint=_DAMAGED)
    cuda = min(state.record["rng"]["cuda_devices"], torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for key in ("rng/torch", *(f"rng/cuda/{index}" for index in range(cuda))):
        if key not in tensors:
            raise CheckpointError(f"{path}: no tensor {key} (the random generator's state)", hint=_DAMAGED)


def load_state_tensors(state: TrainingState) -> dict[str, torch.Tensor]:
    path = state.path / STATE_TENSORS
    recorded = state.record["files"][STATE_TENSORS]
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing from the training state")
    size = check_regular_file(path).st_size
    # bounded work, as umtam.checkpoint.verify_files: a far larger file is refused unread
    if size > recorded["bytes"] + SIZE_SLACK or hash_identified(path)[0] != recorded["sha256"]:
        raise CheckpointError(f"{path}: sha256 does not match {STATE_MARKER}",
                              hint="the file was damaged; resume from the previous step-N directory")
    return load_tensors(path)


def split_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """optimizer.state_dict() as JSON (param_groups, numbers in per-parameter state) plus its tensors."""
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            elif value is None or isinstance(value, (bool, int, float, str)):
                numbers.setdefault(str(index), {})[key] = value
            else:  # GaLore's projector object is what this refuses (STYLE.md)
                raise TypeError(f"optimizer state {index}/{key} is a {type(value).__name__}; "
                                "a training state keeps tensors and numbers only")
    return {"param_groups": state_dict["param_groups"], "numbers": numbers}, tensors


def join_optimizer_state(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of ``split_optimizer_state`` (``tensors`` keyed ``<index>/<key>``)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in record["numbers"].items():
        state.setdefault(int(index), {}).update(entries)
    # JSON turned tuples (betas, Adafactor's eps) into lists; give them back as they were built
    groups = [{key: value if key == "params" or not isinstance(value, list) else tuple(value)
               for key, value in group.items()} for group in record["param_groups"]]
    return {"state": state, "param_groups": groups}


def rescale_peak_lr(optimizer, scheduler, lr: float) -> None:
    """Continue the same warmup/decay schedule with a new peak learning rate."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, multiplier in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python, numpy, torch CPU and CUDA generator states (JSON record, uint8 tensors)."""
    import numpy

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = numpy.random.get_state(legacy=True)
    tensors = {"rng/torch": torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors.update({f"rng/cuda/{index}": value for index, value in enumerate(cuda_states)})
    record = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(key) for key in keys], int(pos), int(has_gauss), float(cached)],
        "cuda_devices": len(cuda_states),
    }
    return record, tensors


def restore_rng(record: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Inverse of ``capture_rng`` (``tensors`` keyed ``torch`` and ``cuda/<device>``)."""
    import numpy

    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = record["numpy"]
    numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if record["cuda_devices"] and torch.cuda.is_available():
        states = [tensors[f"cuda/{index}"] for index in range(record["cuda_devices"])]
        # a machine with fewer devices restores those it has
        for index, value in enumerate(states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value, index)


def weights_finite(model) -> bool:
    """No NaN or inf in any parameter: only such weights make a state worth resuming from."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def _nest(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"<name>/<key>": T}`` -> ``{name: {key: T}}`` (parameter names hold dots, never slashes)."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for path, value in tensors.items():
        name, key = path.rsplit("/", 1)
        nested.setdefault(name, {})[key] = value
    return nested


# ----------------------------------------------------------------------------- writing


class StateWriter:
    """Writes ``step-N/`` states atomically into one directory and keeps the newest ``KEEP_STATES``.

    Refuses, before any work, a directory that already holds another run's
    states (unless ``force``, which replaces them as new ones are written),
    one that is, or lies inside, the output or one of ``inputs`` (the data and
    model directories), a dangling symbolic link or a loop, and a name too
    long for the file system.

    The directory is locked for this run (``umtam-train.lock``, see
    ``StateLock``): an existing one at once, so a second run on it is refused
    before any work, naming the pid that holds it; a new one when the first
    state creates it, so that a run refused later leaves nothing behind (two
    fresh runs on one new directory: the second is refused at its first
    save). Temporary leftovers of a killed write are removed once the lock is
    held. ``close()`` (or leaving a ``with`` block) releases the lock and
    removes the lock file, and the directory if this writer made it and it is
    still empty; an unclosed writer does so when it is collected or at exit.
    """

    def __init__(self, directory: str | Path, *, output: str | Path, force: bool = False,
                 resumed: TrainingState | None = None, inputs: Iterable[str | Path] = ()):
        self.directory = Path(directory)
        self._check_location(Path(output), [Path(source) for source in inputs])
        self._finalizer: weakref.finalize | None = None
        if self.directory.is_dir():
            self._lock()  # before looking at its states: another run may be writing them
        resumed_here = resumed is not None and resumed.path.parent.resolve() == self.directory.resolve()
        self._may_replace = force or resumed_here
        try:
            self._check_no_other_states()
        except BaseException:
            self.close()
            raise
        self.latest: TrainingState | None = resumed
        self._kept: list[Path] = [resumed.path] if resumed_here else []
        self._remove_leftovers()

    def _lock(self) -> None:
        lock = StateLock.acquire(self.directory)
        # released by close(), or when the writer is collected, or at exit
        self._finalizer = weakref.finalize(self, lock.release)

    def _check_no_other_states(self) -> None:
        existing = complete_states(self.directory)
        if existing and not self._may_replace:
            raise ConfigError(
                f"state directory {self.directory} already holds training states (newest {existing[-1].name})",
                hint=f"continue that run with --resume {self.directory}, choose another --state-dir, "
                     "or pass --force to replace them",
            )

    def close(self) -> None:
        """Release the directory for other runs (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "StateWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_location(self, output: Path, inputs: Sequence[Path]) -> None:
        try:
            self._check_paths(output, inputs)
        except OSError as exc:  # e.g. a name too long for the file system
            raise ConfigError(f"state directory {self.directory}: unusable path ({first_line(exc, 200)})") from exc

    def _check_paths(self, output: Path, inputs: Sequence[Path]) -> None:
        what = f"state directory {self.directory}"
        if self.directory.is_symlink() and not self.directory.exists():
            raise ConfigError(f"{what} is a symbolic link to {self.directory.readlink()}, which does not resolve "
                              "(it is dangling or a loop)", hint="choose another --state-dir")
        state_dir = resolve_path(self.directory, what, ConfigError)
        out = resolve_path(output, f"output {output}", ConfigError)
        if state_dir == out or out in state_dir.parents:
            raise ConfigError(f"{what} is inside the output {output}",
                              hint="the output is replaced at the end; choose another --state-dir")
        for source in inputs:
            resolved = resolve_path(source, f"input {source}")
            if state_dir == resolved or resolved in state_dir.parents:
                raise ConfigError(f"{what} is inside {source}",
                                  hint="states would be written among the data or model files; "
                                       "choose another --state-dir")
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"{what} exists and is not a directory")
        if (self.directory / SIDECAR_FILE).is_file():
            raise ConfigError(f"{what} is a checkpoint", hint="choose another --state-dir")
        if not self.directory.exists():
            ancestor = state_dir.parent
            while not ancestor.exists():
                ancestor = ancestor.parent
            check_name_fits(self.directory, ancestor, state_dir.name, what="state directory")

    def save(self, record: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> TrainingState:
        """Write one state (``record`` from ``capture`` plus the run's context) and prune older ones."""
        out = self.directory / f"step-{record['step']:08d}"
        if self._finalizer is None or not self._finalizer.alive:
            # a new directory: made and locked at the first state, so a run refused earlier leaves nothing
            self._lock()
            self._check_no_other_states()  # a run that ended meanwhile may have left some

        def fill(staging: Path) -> dict[str, Any]:
            save_tensors(tensors, staging / STATE_TENSORS)
            complete = {**record, "format": STATE_FORMAT, "schema_version": STATE_SCHEMA_VERSION,
                        "umtam_version": __version__, "files": file_records(staging)}
            write_json_durably(staging / STATE_MARKER, complete)
            return complete

        # replace: a resumed run rewrites the step directories after the one it resumed from
        # (the lock keeps any other run out of this directory)
        complete = write_directory(out, fill, what="training state", replace=True)
        self.latest = TrainingState(out, complete)
        self._kept = [path for path in self._kept if path != out][-(KEEP_STATES - 1):] + [out]
        self._remove_older_states()
        return self.latest

    def _remove_older_states(self) -> None:
        kept = {path.resolve() for path in self._kept}
        for path in self.directory.iterdir():
            if _STEP_DIR.match(path.name) and path.resolve() not in kept:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if _STEP_LEFTOVER.match(path.name):
                shutil.rmtree(path, ignore_errors=True)


@dataclass
class StateLock:
    """An exclusive flock on ``umtam-train.lock`` in a state directory, held for one run.

    The file holds the holder's pid, for the message that refuses a second run.
    Release removes the file while still holding the lock; acquiring therefore
    checks, after locking, that the file it locked is still the one at the path
    (else a run that opened it just before its removal would lock a dead file).
    """

    directory: Path
    fd: int | None
    created: list[Path]  # directories this lock made, outermost first

    @classmethod
    def acquire(cls, directory: Path) -> "StateLock":
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection against a concurrent run
            return cls(directory, None, _make_dirs(directory))
        created = _make_dirs(directory)
        path = directory / LOCK_FILE
        while True:
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _holder(fd)
                os.close(fd)
                if isinstance(exc, BlockingIOError):
                    raise UmtamError(f"state directory {directory} is in use by another umtam train run "
                                     f"(pid {holder})", hint="wait for it to end, or give this run another "
                                                             "--state-dir") from None
                raise UmtamError(f"state directory {directory}: cannot lock {LOCK_FILE} ({first_line(exc)})"
                                 ) from exc
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(directory, fd, created)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.directory / LOCK_FILE)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        for path in reversed(self.created):
            try:
                path.rmdir()  # only if still empty: a run that wrote states keeps them
            except OSError:
                break
        self.created = []


def _make_dirs(directory: Path) -> list[Path]:
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UmtamError(f"cannot create state directory {directory} ({first_line(exc, 200)})") from exc
    return missing[::-1]


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                       0o644)
    except OSError as exc:
        raise UmtamError(f"state directory {path.parent}: cannot open {path.name} ({first_line(exc, 200)})") from exc


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)


def diverged_error(step: int, what: str, latest: TrainingState | None, state_dir: Path | None,
                   lr: float) -> DivergenceError:
    """The one-line message for a NaN/inf: which step, and how to go on from the last state saved before it.

    That state had finite weights and losses; whether a lower learning rate
    rescues it (or an earlier state is needed) only resuming can tell.
    """
    if latest is None:
        return DivergenceError(f"training diverged at step {step}: {what}",
                               hint="lower --lr or check the data; no checkpoint was written")
    return DivergenceError(
        f"training diverged at step {step}: {what}; the last good state is {latest.path} (step {latest.step})",
        hint=f"no checkpoint was written; continue with a lower learning rate: "
             f"umtam train --resume {state_dir or latest.path} --lr {lr / 10:g}",
    )
