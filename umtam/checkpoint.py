"""The checkpoint directory: file names, the sidecar, atomic writes, validation.

A checkpoint is a directory holding

    model.safetensors   weights, keyed by model.state_dict() names (a merge keeps
                        one encoder plus ``heads/<task>/<key>`` per task)
    stats.safetensors   training statistics keyed ``<stat>/<parameter name>``
    umtam.json          the sidecar, written last
    config.json, tokenizer files   so transformers' from_pretrained(dir) loads it

A directory without a valid sidecar is not a checkpoint. Writes build the whole
directory under a temporary name beside the target and rename it into place, so
a crash leaves either the old output or nothing that loads.

Reading trusts nothing in the files: the sidecar's fields are type-checked
(validate_sidecar), every listed file's sha256 is checked, and each safetensors
header is read and validated here (read_safetensors_header) before the
safetensors library sees the file. Every problem is a CheckpointError naming
the file and the field or tensor.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from umtam.errors import CheckpointError, ConfigError, UmtamError, first_line

MODEL_FILE = "model.safetensors"
STATS_FILE = "stats.safetensors"
SIDECAR_FILE = "umtam.json"
SCHEMA_VERSION = 1
KINDS = ("train", "prune", "merge")
HEADS_PREFIX = "heads/"
REQUIRED_FIELDS = ("schema_version", "kind", "tasks", "base_model", "files")
_HASH_CHUNK = 1 << 20
# A write stages ".<name>.tmp-<pid>-<random>" beside its target and, where it cannot
# swap atomically, moves the old output to ".<name>.old-<pid>" for an instant.
_LEFTOVER = re.compile(r"^\..+\.(?:tmp|old)-")
_STAGING_PID = re.compile(r"^\..+\.tmp-(\d+)-")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Checkpoint:
    """A validated checkpoint directory and its sidecar."""

    path: Path
    sidecar: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.sidecar["kind"]

    @property
    def tasks(self) -> dict[str, Any]:
        """Task name -> task record (label names, regression flag, metrics)."""
        return self.sidecar["tasks"]

    @property
    def base_fingerprint(self) -> str:
        return self.sidecar["base_model"]["fingerprint"]

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def stats_file(self) -> Path | None:
        return self.path / STATS_FILE if STATS_FILE in self.sidecar["files"] else None

    def load_tensors(self) -> dict:
        return _load_safetensors(self.model_file)

    def load_stats(self) -> dict:
        return _load_safetensors(self.stats_file) if self.stats_file else {}


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    read_safetensors_header(path)  # the checks safetensors lacks, before it trusts the header
    try:
        return load_file(str(path))
    except Exception as exc:  # the binding raises SafetensorError, OSError, TypeError...: all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc, 200)})") from exc


# ----------------------------------------------------------------------------- safetensors headers

# Item size in bytes of each safetensors dtype umtam reads (all load as torch tensors);
# sub-byte and complex types are refused as unknown.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
# safetensors' own cap on the JSON header; checked before a byte of it is read.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# torch sizes are int64: a larger dimension, or a product of dimensions beyond it, fails
# deep inside the loader (a zero-size tensor can otherwise claim any shape).
_MAX_ELEMENTS = 2**63 - 1
_TENSOR_FIELDS = ("data_offsets", "dtype", "shape")
_METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a validated safetensors header describes it (offsets into the data section)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: str | Path) -> dict[str, TensorEntry]:
    """Read and validate a safetensors file's header without trusting any of it.

    The 8-byte length must fit the file (and safetensors' 100 MiB cap) before the
    header is read; the header must be a JSON object of tensors with known dtypes,
    int64-sized shapes and offsets that tile the data section exactly, each
    tensor's byte length matching its shape. Every failure is a CheckpointError
    naming the file, so nothing downstream (safe_open, load_file) meets a
    malformed file.
    """
    path = Path(path)
    raw, data_bytes = _read_raw_header(path)
    header = _parse_header_json(raw, path)
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _unreadable(path, f"{_METADATA_KEY} must map strings to strings")
    entries = {name: _tensor_entry(name, info, path) for name, info in header.items()}
    _check_tiling(entries, data_bytes, path)
    return entries


def _unreadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({reason})")


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """(header bytes, data section length); the length field is checked before it is trusted."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _unreadable(path, f"{size} bytes, too short for the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > size - 8:
                raise _unreadable(path, f"header length {length} exceeds the {size - 8} bytes that follow it")
            if length > MAX_HEADER_BYTES:
                raise _unreadable(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({first_line(exc, 200)})") from exc
    if len(raw) != length:
        raise _unreadable(path, "the file changed while it was read")
    return raw, size - 8 - length


def _parse_header_json(raw: bytes, path: Path) -> dict[str, Any]:
    # safetensors requires the object to start at the first byte (trailing spaces pad it).
    if not raw.startswith(b"{"):
        raise _unreadable(path, "the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _unreadable(path, f"header is not valid JSON: {first_line(exc, 200)}") from exc
    if not isinstance(header, dict):
        raise _unreadable(path, "the header is not a JSON object")
    for name in header:
        if not _is_utf8(name):
            raise _unreadable(path, f"tensor name {name!r} is not valid UTF-8")
    return header


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def _is_utf8(text: str) -> bool:
    # Python's json accepts lone surrogate escapes ("\\ud800"); safetensors' parser does not.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, info: Any, path: Path) -> TensorEntry:
    where = f"tensor {name!r}"
    if not isinstance(info, dict) or sorted(info) != sorted(_TENSOR_FIELDS):
        raise _unreadable(path, f"{where} must have exactly the fields {', '.join(_TENSOR_FIELDS)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _unreadable(path, f"{where} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(size) and size >= 0 for size in shape):
        raise _unreadable(path, f"{where} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise _unreadable(path, f"{where} has invalid data_offsets {offsets!r}")
    elements = 1
    for size in shape:  # in order, as the loader multiplies: a later 0 does not undo an overflow
        elements *= size
        if size > _MAX_ELEMENTS or elements > _MAX_ELEMENTS:
            raise _unreadable(path, f"{where} has shape {shape} beyond int64 sizes")
    expected = elements * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise _unreadable(path, f"{where} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {expected}")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_tiling(entries: Mapping[str, TensorEntry], data_bytes: int, path: Path) -> None:
    """Tensors must cover the data section end to end: no gap, no overlap, nothing past the end."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps the tensor before it" if entry.begin < position else f"leaves a gap at byte {position}"
            raise _unreadable(path, f"tensor {name!r} at bytes {entry.begin}..{entry.end} {problem}")
        position = entry.end
    if position != data_bytes:
        raise _unreadable(path, f"tensors cover {position} bytes of a {data_bytes}-byte data section")


# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint directory, validating its sidecar and (by default) its files.

    ``verify`` checks every listed file's sha256 and the safetensors headers of
    the weights and statistics, so a loaded checkpoint's files can be handed to
    safetensors (``safe_open``, ``load_file``) as they are.
    """
    directory = Path(path)
    try:
        exists, is_dir = directory.exists(), directory.is_dir()
    except OSError as exc:  # e.g. a name too long for the file system
        raise CheckpointError(f"{directory}: cannot open ({first_line(exc, 200)})") from exc
    if not exists:
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not is_dir:
        raise CheckpointError(f"{directory}: not a directory")
    if is_write_leftover(directory):
        raise CheckpointError(f"{directory}: the temporary directory of an interrupted write, not a checkpoint",
                              hint="delete it; the next write to the same output removes it")
    sidecar_path = directory / SIDECAR_FILE
    if not sidecar_path.is_file():
        raise CheckpointError(
            f"{directory}: not a umtam checkpoint (no {SIDECAR_FILE})",
            hint=_not_a_checkpoint_hint(directory),
        )
    sidecar = read_sidecar(sidecar_path)
    if verify:
        verify_files(directory, sidecar)
        for name in (MODEL_FILE, STATS_FILE):
            if name in sidecar["files"]:
                read_safetensors_header(directory / name)
    return Checkpoint(directory, sidecar)


# A sidecar is metadata: megabytes at most (a long loss curve). Anything far larger is
# not one, and is refused before it is read into memory.
MAX_SIDECAR_BYTES = 64 * 1024 * 1024


def _not_a_checkpoint_hint(directory: Path) -> str:
    # "umtam-state.json" marks umtam.resume's training states (named here, not imported: resume imports torch)
    if (directory / "umtam-state.json").is_file() or any(directory.glob("step-*/umtam-state.json")):
        return f"it is a training state; continue it with: umtam train --resume {directory}"
    return "it may be a plain Hugging Face model or an interrupted write"


def is_write_leftover(path: str | Path) -> bool:
    """A staging or retired directory of a write, complete or not: never a checkpoint."""
    return _LEFTOVER.match(Path(path).name) is not None


def read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    try:
        size = sidecar_path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise CheckpointError(
                f"{sidecar_path}: {size} bytes, too large for a sidecar ({MAX_SIDECAR_BYTES} at most)")
        text = sidecar_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{sidecar_path}: cannot read ({first_line(exc, 200)})") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{sidecar_path}: not valid JSON (not UTF-8: {first_line(exc, 200)})") from exc
    try:
        sidecar = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{sidecar_path}: not valid JSON ({first_line(exc, 200)})") from exc
    validate_sidecar(sidecar, sidecar_path)
    return sidecar


def validate_sidecar(sidecar: Any, where: Path) -> None:
    """Check every field a consumer (inspect, prune, merge, eval) reads; name the first problem.

    Required fields must be present; optional ones, when present, must have the
    JSON type their readers expect (null allowed where umtam itself writes null).
    """
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{where}: the sidecar must be a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in sidecar]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
    version = sidecar["schema_version"]
    if not _is_int(version):
        raise CheckpointError(f"{where}: schema_version must be an integer, got {_short(version)}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{where}: schema_version {version} is newer than this umtam understands ({SCHEMA_VERSION})",
            hint="upgrade umtam",
        )
    if version < 1:
        raise CheckpointError(f"{where}: invalid schema_version {version}")
    if not isinstance(sidecar["kind"], str) or sidecar["kind"] not in KINDS:
        raise CheckpointError(f"{where}: kind {_short(sidecar['kind'])} is not one of {', '.join(KINDS)}")
    _validate_tasks(sidecar["tasks"], where)
    _validate_base(sidecar["base_model"], where)
    _validate_files(sidecar["files"], where)
    _validate_optional(sidecar, where)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for a one-line message: escaped, and cut when long (it may be garbage)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


_PLAIN_FIELD = re.compile(r"[A-Za-z0-9_-]+")


def _field(first: str, *parts: str) -> str:
    """tasks.mrpc.label_names; a part that would read ambiguously is bracketed: files['config.json']."""
    return first + "".join(f".{part}" if _PLAIN_FIELD.fullmatch(part) else f"[{part!r}]" for part in parts)


def _require(ok: bool, where: Path, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise CheckpointError(f"{where}: {field} must be {expected}, got {_short(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_metrics(value: Any) -> bool:
    """{metric: number} or {split: {metric: number}}; null anywhere means "not measured"."""
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    return all(item is None or _is_number(item) or (
        isinstance(item, dict) and all(inner is None or _is_number(inner) for inner in item.values()))
        for item in value.values())


def _validate_tasks(tasks: Any, where: Path) -> None:
    if not isinstance(tasks, dict) or not tasks:
        raise CheckpointError(f"{where}: 'tasks' must be a non-empty object of task records")
    for name, record in tasks.items():
        # Merged heads live under heads/<task>/<key>: a task name cannot hold a '/'.
        _require(bool(name) and "/" not in name and name.isprintable(), where, "a task name",
                 "a non-empty printable name without '/'", name)
        if not isinstance(record, dict) or not isinstance(record.get("label_names"), list):
            raise CheckpointError(f"{where}: {_field('tasks', name)} must be an object with a 'label_names' list")
        labels = record["label_names"]
        _require(_is_str_list(labels), where, _field("tasks", name, "label_names"), "a list of strings", labels)
        regression = record.get("is_regression", False)
        _require(isinstance(regression, bool), where, _field("tasks", name, "is_regression"), "true or false",
                 regression)
        _require(regression or bool(labels), where, _field("tasks", name, "label_names"),
                 "non-empty for a classification task", labels)
        for key, value in record.items():
            if key.endswith("metrics"):
                _require(_is_metrics(value), where, _field("tasks", name, key),
                         "an object of numbers (or of such objects per split)", value)


def _validate_base(base: Any, where: Path) -> None:
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise CheckpointError(f"{where}: 'base_model' must be an object with a 'fingerprint' string")
    for key in ("reference", "location", "origin"):
        value = base.get(key)
        _require(value is None or isinstance(value, str), where, _field("base_model", key), "a string", value)
    seed = base.get("init_seed", 0)
    _require(_is_int(seed), where, "base_model.init_seed", "an integer", seed)


def _validate_files(files: Any, where: Path) -> None:
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{where}: 'files' must list {MODEL_FILE}")
    for name, record in files.items():
        if not is_plain_file_name(name):
            raise CheckpointError(
                f"{where}: file entry {_short(name)} points outside the checkpoint directory",
                hint="a sidecar may only name files inside its own directory",
            )
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise CheckpointError(f"{where}: {_field('files', name)} must be an object with a 'sha256' string")
        digest = record["sha256"]
        _require(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest), where,
                 _field("files", name, "sha256"), "64 lowercase hex digits", digest)
        size = record.get("bytes", 0)
        _require(_is_count(size), where, _field("files", name, "bytes"), "a non-negative integer", size)


# Optional top-level fields -> (check, what it must be); inspect renders them all.
_OPTIONAL_FIELDS = {
    "steps": (_is_count, "a non-negative integer"),
    "seed": (_is_int, "an integer"),
    "peak_rss_bytes": (_is_count, "a non-negative integer"),
    "peak_gpu_bytes": (_is_count, "a non-negative integer"),
    "seconds_per_step": (_is_number, "a number"),
}


def _validate_optional(sidecar: Mapping[str, Any], where: Path) -> None:
    for key, (check, expected) in _OPTIONAL_FIELDS.items():
        value = sidecar.get(key)
        _require(value is None or check(value), where, key, expected, value)
    _validate_optimizer(sidecar.get("optimizer"), where)
    _validate_lineage(sidecar.get("lineage"), where)


def _validate_optimizer(optimizer: Any, where: Path) -> None:
    if optimizer is None:
        return
    _require(isinstance(optimizer, dict) and isinstance(optimizer.get("name"), str), where, "optimizer",
             "an object with a 'name' string", optimizer)
    hparams = optimizer.get("hyperparameters", {})
    _require(isinstance(hparams, dict), where, "optimizer.hyperparameters", "an object", hparams)
    state = optimizer.get("state_bytes")
    _require(state is None or _is_count(state), where, "optimizer.state_bytes", "a non-negative integer", state)


def _validate_lineage(lineage: Any, where: Path) -> None:
    if lineage is None:
        return
    _require(isinstance(lineage, dict), where, "lineage", "an object", lineage)
    method = lineage.get("method")  # a merge's method name, or a prune's options
    _require(method is None or isinstance(method, (str, dict)), where, "lineage.method", "a string or an object",
             method)
    options = lineage.get("options", {})
    _require(isinstance(options, dict), where, "lineage.options", "an object", options)
    inputs = lineage.get("inputs", [])
    _require(isinstance(inputs, list), where, "lineage.inputs", "a list", inputs)
    for index, item in enumerate(inputs):
        field = f"lineage.inputs[{index}]"
        _require(isinstance(item, dict), where, field, "an object", item)
        for key in ("path", "sha256"):
            value = item.get(key)
            _require(value is None or isinstance(value, str), where, f"{field}.{key}", "a string", value)
        tasks = item.get("tasks", [])
        _require(_is_str_list(tasks), where, f"{field}.tasks", "a list of strings", tasks)


def is_plain_file_name(name: Any) -> bool:
    """A bare, printable file name: no separators, no parent references, nothing absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()  # no NUL, and no newline to break a one-line error message
    )


def verify_files(directory: Path, sidecar: Mapping[str, Any]) -> None:
    for name, record in sidecar["files"].items():
        file_path = directory / name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: listed in {SIDECAR_FILE} but missing")
        try:
            actual = sha256_file(file_path)
        except OSError as exc:
            raise CheckpointError(f"{file_path}: cannot read ({first_line(exc, 200)})") from exc
        if actual != record["sha256"]:
            raise CheckpointError(
                f"{file_path}: sha256 mismatch (sidecar {record['sha256'][:12]}..., file {actual[:12]}...)",
                hint="the file was modified or truncated after the checkpoint was written",
            )


# ----------------------------------------------------------------------------- writing


def check_output_dir(output: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output location before any work is done, so nothing is half-written.

    Refused: an output inside an input (or the input itself), an output that
    contains an input (--force would delete it), an existing output without
    ``force``, and a location that cannot be created (a parent that is a file,
    or not writable).
    """
    out = Path(output)
    try:
        resolved = out.resolve()
        for source in inputs:
            _check_apart(out, resolved, Path(source))
        exists = out.exists()
    except OSError as exc:  # e.g. a name too long for the file system
        raise ConfigError(f"output {out}: unusable path ({first_line(exc, 200)})") from exc
    if exists and not force:
        raise ConfigError(f"output {out} already exists", hint="pass --force to replace it")
    if exists and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    _check_creatable(out, resolved)
    return out


def _check_apart(out: Path, resolved: Path, source: Path) -> None:
    source_resolved = source.resolve()
    if resolved == source_resolved or source_resolved in resolved.parents:
        raise ConfigError(f"output {out} is inside input {source}", hint="choose a separate directory")
    if resolved in source_resolved.parents:
        raise ConfigError(f"output {out} contains input {source}",
                          hint="choose a separate directory; replacing it would delete the input")


def _check_creatable(out: Path, resolved: Path) -> None:
    """The nearest existing ancestor must be a directory we may write (mkdir creates the rest)."""
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UmtamError(f"output {out}: cannot write to {ancestor} (permission denied)")


def write_checkpoint(
    output: str | Path,
    *,
    tensors: Mapping[str, Any],
    sidecar: dict[str, Any],
    stats: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | Path] | None = None,
    force: bool = False,
) -> Checkpoint:
    """Write a checkpoint atomically and return it.

    ``sidecar`` holds everything but ``schema_version`` and ``files``, which are
    filled in here from what was actually written. ``extra_files`` maps a bare
    file name to bytes or to a file to copy (config.json, tokenizer files).
    """
    out = check_output_dir(output, force=force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise UmtamError(f"cannot create output {out} ({first_line(exc, 200)})") from exc
    try:
        files = _write_payload(staging, tensors, stats, extra_files or {})
        complete = {**sidecar, "schema_version": SCHEMA_VERSION, "files": files}
        validate_sidecar(complete, staging / SIDECAR_FILE)
        write_json_durably(staging / SIDECAR_FILE, complete)
        swap_into_place(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk or a vanished directory: the user's to fix, not a bug
            raise UmtamError(f"cannot write output {out} ({first_line(exc, 200)})") from exc
        raise
    return Checkpoint(out, complete)


def remove_dead_leftovers(out: Path) -> None:
    """Delete staging directories that killed writes to ``out`` left behind.

    Only those of processes no longer alive: a concurrent write keeps its own.
    A retired ``.old-`` directory is left alone: after a crash between the two
    renames of a non-atomic replace it holds the only copy of the old output.
    """
    for path in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        match = _STAGING_PID.match(path.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and someone else's
        return True
    return True


def _write_payload(staging: Path, tensors, stats, extra_files) -> dict[str, dict[str, Any]]:
    from safetensors.torch import save_file

    save_file(cpu_contiguous(tensors), str(staging / MODEL_FILE), metadata={"format": "pt"})
    if stats:
        save_file(cpu_contiguous(stats), str(staging / STATS_FILE), metadata={"format": "pt"})
    for name, content in extra_files.items():
        if not is_plain_file_name(name):
            raise ValueError(f"extra file name {name!r} must be a bare file name")
        if isinstance(content, bytes):
            (staging / name).write_bytes(content)
        else:
            shutil.copyfile(content, staging / name)
    return {
        path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(staging.iterdir())
    }


def cpu_contiguous(tensors: Mapping[str, Any]) -> dict:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def write_json_durably(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def swap_into_place(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out (only with --force) is replaced.

    On Linux the two directories trade places in one atomic step, so out always
    holds the old or the new checkpoint, then the old one (now at the staging
    name) is removed. Elsewhere the old one is moved aside first, and for the
    instant between the two renames neither exists.
    """
    for path in staging.iterdir():
        _fsync_file(path)
    if not out.exists():
        os.rename(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # the staging name now holds the old output
    else:
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_dir(out.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    # non-zero: a kernel or filesystem without exchange (ENOSYS, EINVAL); the caller falls back
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- keys


def head_key(task: str, key: str) -> str:
    """Where a task's classification-head tensor lives in a merged checkpoint."""
    return f"{HEADS_PREFIX}{task}/{key}"


def split_head_key(key: str) -> tuple[str, str] | None:
    """('task', 'classifier.weight') for a merged head key, else None."""
    if not key.startswith(HEADS_PREFIX):
        return None
    task, _, rest = key[len(HEADS_PREFIX):].partition("/")
    return (task, rest) if task and rest else None
