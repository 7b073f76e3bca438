"""The checkpoint directory: its files, loading it with every check, writing it atomically.

A checkpoint is a directory holding

    model.safetensors   weights, keyed by model.state_dict() names (a merge keeps
                        one encoder plus ``heads/<task>/<key>`` per task, umtam.heads)
    stats.safetensors   training statistics keyed ``<stat>/<parameter name>``
    umtam.json          the sidecar (umtam.sidecar), written last
    config.json, tokenizer files   so transformers' from_pretrained(dir) loads it

A directory without a valid sidecar is not a checkpoint. Loading trusts
nothing: the sidecar is validated (umtam.sidecar), every listed file's sha256
is checked and the safetensors files are opened (umtam.safetensors_io) before
anything reads them. Writing builds the whole directory beside the target and
swaps it into place (umtam.atomic), so a crash leaves the old output or
nothing that loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from umtam.atomic import check_output_dir, file_records, is_write_leftover, sha256_file, write_directory
from umtam.errors import CheckpointError, first_line
from umtam.safetensors_io import load_tensors, open_safetensors, save_tensors
from umtam.sidecar import (MODEL_FILE, SCHEMA_VERSION, SIDECAR_FILE, Sidecar, TaskRecord, is_plain_file_name,
                           make_sidecar, read_sidecar, write_sidecar)

STATS_FILE = "stats.safetensors"
# Written by umtam.resume into each training state (named here, not imported: resume imports torch).
STATE_MARKER = "umtam-state.json"

__all__ = ["MODEL_FILE", "SIDECAR_FILE", "STATS_FILE", "Checkpoint", "check_output_dir", "load_checkpoint",
           "write_checkpoint"]


@dataclass
class Checkpoint:
    """A validated checkpoint directory and its sidecar."""

    path: Path
    sidecar: Sidecar

    @property
    def kind(self) -> str:
        return self.sidecar.kind

    @property
    def tasks(self) -> dict[str, TaskRecord]:
        """Task name -> task record (label names, regression flag, metrics)."""
        return self.sidecar.tasks

    @property
    def base_fingerprint(self) -> str | None:
        return self.sidecar.base_model.fingerprint

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def stats_file(self) -> Path | None:
        return self.path / STATS_FILE if STATS_FILE in self.sidecar.files else None

    @property
    def is_plain(self) -> bool:
        """A plain Hugging Face directory (umtam.hf_interop): no statistics, no recorded base."""
        from umtam.sidecar import PLAIN_FORMAT

        return self.sidecar.format == PLAIN_FORMAT

    def load_tensors(self) -> dict:
        return load_tensors(self.model_file)

    def load_stats(self) -> dict:
        return load_tensors(self.stats_file) if self.stats_file else {}

    def companion_files(self) -> dict[str, Path]:
        """config.json, tokenizer files: every listed file but the weights, statistics and sidecar."""
        skip = {MODEL_FILE, STATS_FILE, SIDECAR_FILE}
        return {name: self.path / name for name in sorted(self.sidecar.files) if name not in skip}


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint directory, validating its sidecar and (by default) its files.

    ``verify`` checks every listed file's sha256 and opens the weights and
    statistics, so a loaded checkpoint's files can be read as they are.
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
        raise CheckpointError(f"{directory}: not a umtam checkpoint (no {SIDECAR_FILE})",
                              hint=_not_a_checkpoint_hint(directory))
    sidecar = read_sidecar(sidecar_path)
    if verify:
        verify_files(directory, sidecar)
        for name in (MODEL_FILE, STATS_FILE):
            if name in sidecar.files:
                with open_safetensors(directory / name):
                    pass
    return Checkpoint(directory, sidecar)


def _not_a_checkpoint_hint(directory: Path) -> str:
    if (directory / STATE_MARKER).is_file() or any(directory.glob(f"step-*/{STATE_MARKER}")):
        return f"it is a training state; continue it with: umtam train --resume {directory}"
    return "it may be a plain Hugging Face model or an interrupted write"


def verify_files(directory: Path, sidecar: Sidecar) -> None:
    for name, record in sidecar.files.items():
        file_path = directory / name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: listed in {SIDECAR_FILE} but missing")
        try:
            actual = sha256_file(file_path)
        except OSError as exc:
            raise CheckpointError(f"{file_path}: cannot read ({first_line(exc, 200)})") from exc
        if actual != record.sha256:
            raise CheckpointError(
                f"{file_path}: sha256 mismatch (sidecar {record.sha256[:12]}..., file {actual[:12]}...)",
                hint="the file was modified or truncated after the checkpoint was written",
            )


def write_checkpoint(
    output: str | Path,
    *,
    tensors: Mapping[str, Any],
    sidecar: Sidecar | Mapping[str, Any],
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
    fields = sidecar.as_json() if isinstance(sidecar, Sidecar) else dict(sidecar)

    def fill(staging: Path) -> Sidecar:
        _write_payload(staging, tensors, stats, extra_files or {})
        complete = make_sidecar({**fields, "schema_version": SCHEMA_VERSION, "files": file_records(staging)},
                                staging / SIDECAR_FILE)
        write_sidecar(staging / SIDECAR_FILE, complete)
        return complete

    return Checkpoint(out, write_directory(out, fill))


def _write_payload(staging: Path, tensors, stats, extra_files) -> None:
    import shutil

    save_tensors(tensors, staging / MODEL_FILE)
    if stats:
        save_tensors(stats, staging / STATS_FILE)
    for name, content in extra_files.items():
        if not is_plain_file_name(name):
            raise ValueError(f"extra file name {name!r} must be a bare file name")
        if isinstance(content, bytes):
            (staging / name).write_bytes(content)
        else:
            shutil.copyfile(content, staging / name)
