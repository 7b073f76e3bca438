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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from exc



# ----------------------------------------------------------------------------- loading


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint directory, validating its sidecar and (by default) file hashes."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    sidecar_path = directory / SIDECAR_FILE
    if not sidecar_path.is_file():
        raise CheckpointError(
            f"{directory}: not a umtam checkpoint (no {SIDECAR_FILE})",
            hint="it may be a plain Hugging Face model or an interrupted write",
        )
    sidecar = read_sidecar(sidecar_path)
    if verify:
        verify_files(directory, sidecar)
    return Checkpoint(directory, sidecar)


def read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{sidecar_path}: not valid JSON ({first_line(exc)})") from exc
    validate_sidecar(sidecar, sidecar_path)
    return sidecar


def validate_sidecar(sidecar: Any, where: Path) -> None:
    """Check the fields every consumer relies on; name the first problem."""
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"{where}: the sidecar must be a JSON object")
    missing = [key for key in REQUIRED_FIELDS if key not in sidecar]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}")
    version = sidecar["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{where}: schema_version {version} is newer than this umtam understands ({SCHEMA_VERSION})",
            hint="upgrade umtam",
        )
    if version < 1:
        raise CheckpointError(f"{where}: invalid schema_version {version}")
    if sidecar["kind"] not in KINDS:
        raise CheckpointError(f"{where}: kind {sidecar['kind']!r} is not one of {', '.join(KINDS)}")
    _validate_tasks(sidecar["tasks"], where)
    _validate_base(sidecar["base_model"], where)
    _validate_files(sidecar["files"], where)


def _validate_tasks(tasks: Any, where: Path) -> None:
    if not isinstance(tasks, dict) or not tasks:
        raise CheckpointError(f"{where}: 'tasks' must be a non-empty object of task records")
    for name, record in tasks.items():
        if not isinstance(record, dict) or not isinstance(record.get("label_names"), list):
            raise CheckpointError(f"{where}: tasks.{name} must be an object with a 'label_names' list")


def _validate_base(base: Any, where: Path) -> None:
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise CheckpointError(f"{where}: 'base_model' must be an object with a 'fingerprint' string")


def _validate_files(files: Any, where: Path) -> None:
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(f"{where}: 'files' must list {MODEL_FILE}")
    for name, record in files.items():
        if not is_plain_file_name(name):
            raise CheckpointError(
                f"{where}: file entry {name!r} points outside the checkpoint directory",
                hint="a sidecar may only name files inside its own directory",
            )
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise CheckpointError(f"{where}: files.{name} must be an object with a 'sha256' string")


def is_plain_file_name(name: Any) -> bool:
    """A bare file name: no separators, no parent references, nothing absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


def verify_files(directory: Path, sidecar: Mapping[str, Any]) -> None:
    for name, record in sidecar["files"].items():
        file_path = directory / name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: listed in {SIDECAR_FILE} but missing")
        actual = sha256_file(file_path)
        if actual != record["sha256"]:
            raise CheckpointError(
                f"{file_path}: sha256 mismatch (sidecar {record['sha256'][:12]}..., file {actual[:12]}...)",
                hint="the file was modified or truncated after the checkpoint was written",
            )


# ----------------------------------------------------------------------------- writing


def check_output_dir(output: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output location before any work is done, so nothing is half-written."""
    out = Path(output)
    resolved = out.resolve()
    for source in inputs:
        source_resolved = Path(source).resolve()
        if resolved == source_resolved or source_resolved in resolved.parents:
            raise ConfigError(f"output {out} is inside input {source}", hint="choose a separate directory")
    if out.exists() and not force:
        raise ConfigError(f"output {out} already exists", hint="pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is not a directory")
    parent = resolved.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UmtamError(f"cannot write to {parent}: permission denied")
    return out


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
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = _write_payload(staging, tensors, stats, extra_files or {})
        complete = {**sidecar, "schema_version": SCHEMA_VERSION, "files": files}
        validate_sidecar(complete, staging / SIDECAR_FILE)
        _write_json_durably(staging / SIDECAR_FILE, complete)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Checkpoint(out, complete)


def _write_payload(staging: Path, tensors, stats, extra_files) -> dict[str, dict[str, Any]]:
    from safetensors.torch import save_file

    save_file(_contiguous(tensors), str(staging / MODEL_FILE), metadata={"format": "pt"})
    if stats:
        save_file(_contiguous(stats), str(staging / STATS_FILE), metadata={"format": "pt"})
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


def _contiguous(tensors: Mapping[str, Any]) -> dict:
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def _write_json_durably(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename staging to out; an existing out (only with --force) is moved aside first.

    Two renames are not one atomic step, so for the instant between them
    neither exists; the old directory is removed only after the new one is in place.
    """
    for path in staging.iterdir():
        _fsync_file(path)
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, out)
    _fsync_dir(out.parent)


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
