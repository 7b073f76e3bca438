"""The checkpoint directory: its files, loading it with every check, writing it atomically.

A checkpoint is a directory holding

    model.safetensors   weights, keyed by model.state_dict() names (a merge keeps
                        one encoder plus ``heads/<task>/<key>`` per task, umtam.heads);
                        or, sharded, model.safetensors.index.json and the shards it
                        names (umtam.shards), as transformers writes large models
    stats.safetensors   training statistics keyed ``<stat>/<parameter name>``
    umtam.json          the sidecar (umtam.sidecar), written last
    config.json, tokenizer files   so transformers' from_pretrained(dir) loads it

A directory without a valid sidecar is not a checkpoint. Loading trusts
nothing: the sidecar is validated (umtam.sidecar), every listed file must be a
regular file (a symbolic link only to a file beside it), no larger than its
recorded size allows, and match its sha256, and the safetensors files are
opened (umtam.safetensors_io) before anything reads them. Each file's identity
(size, mtime, inode) is recorded as it is hashed, so a reader can check that
nothing rewrote or truncated it since (``Checkpoint.check_unchanged``).
Writing builds the whole directory beside the target and renames it into
place (umtam.atomic), so a crash leaves the old output or nothing that loads.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from umtam.atomic import (FileIdentity, changed_error, check_output_dir, check_regular_file, copy_regular_file,
                          current_identity, file_records, hash_identified, is_write_leftover, write_directory)
from umtam.errors import CheckpointError, first_line
from umtam.safetensors_io import load_tensors, open_safetensors, save_tensors
from umtam.shards import load_weights, open_weights, weight_files, weight_shapes, write_weights
from umtam.sidecar import (INDEX_FILE, MODEL_FILE, SCHEMA_VERSION, SIDECAR_FILE, Sidecar, TaskRecord,
                           is_plain_file_name, make_sidecar, read_sidecar, write_sidecar)

STATS_FILE = "stats.safetensors"
# Written by umtam.resume into each training state (named here, not imported: resume imports torch).
STATE_MARKER = "umtam-state.json"
# A file may exceed its recorded size by this much and still be hashed (the sha256 then
# decides); anything larger cannot match and is refused unread, however large it is.
SIZE_SLACK = 1 << 20

__all__ = ["INDEX_FILE", "MODEL_FILE", "SIDECAR_FILE", "STATS_FILE", "Checkpoint", "check_output_dir", "load_checkpoint",
           "write_checkpoint"]


@dataclass
class Checkpoint:
    """A validated checkpoint directory and its sidecar."""

    path: Path
    sidecar: Sidecar
    # file name -> identity when it was hashed (empty when loaded without verify)
    identities: dict[str, FileIdentity] = field(default_factory=dict)
    # statistics that are not a stats.safetensors: a plain input's, from its optimizer.pt (umtam.adam_import)
    imported_stats: Mapping[str, Any] | None = None
    # a plain input hashed in the background (hf_interop): {file: (sha256, identity)} once done; see settle()
    pending_hashes: Future | None = None

    def settle(self) -> None:
        """Wait for background hashes and put them in the sidecar; a file changed since it was opened is refused.

        Until then the sidecar lists each file's size with a placeholder sha256:
        whatever records a lineage calls this first.
        """
        if self.pending_hashes is None:
            return
        hashed = self.pending_hashes.result()
        for name, (_, identity) in hashed.items():
            now = current_identity(self.path / name)  # unchanged from opening, through hashing, until now
            change = self.identities[name].difference(identity) or (
                "it was removed" if now is None else self.identities[name].difference(now))
            if change:
                raise changed_error(self.path / name, change)
        fields = self.sidecar.as_json()
        fields["files"] = {name: {"sha256": digest, "bytes": identity.size} for name, (digest, identity) in hashed.items()}
        self.sidecar = make_sidecar(fields, self.path)
        self.pending_hashes = None

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
        """model.safetensors, or the index of sharded weights: the file messages name for the weights."""
        return self.path / (INDEX_FILE if INDEX_FILE in self.sidecar.files else MODEL_FILE)

    @property
    def weight_file_names(self) -> list[str]:
        """[model.safetensors], or the index and every shard (umtam.shards)."""
        return weight_files(self.path)

    def weights_bytes(self) -> int:
        return sum(self.sidecar.files[name].bytes if name in self.sidecar.files else (self.path / name).stat().st_size
                   for name in self.weight_file_names)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight name -> shape, from the safetensors headers alone."""
        return weight_shapes(self.path)

    @property
    def stats_file(self) -> Path | None:
        return self.path / STATS_FILE if STATS_FILE in self.sidecar.files else None

    @property
    def is_plain(self) -> bool:
        """A plain Hugging Face directory (umtam.hf_interop): no statistics, no recorded base."""
        from umtam.sidecar import PLAIN_FORMAT

        return self.sidecar.format == PLAIN_FORMAT

    def load_tensors(self) -> dict:
        return load_weights(self.path)

    def load_stats(self) -> dict:
        if self.imported_stats is not None:
            return dict(self.imported_stats)
        return load_tensors(self.stats_file) if self.stats_file else {}

    def companion_files(self) -> dict[str, Path]:
        """config.json, tokenizer files: every listed file but the weights, statistics, sidecar and a
        Trainer checkpoint's optimizer state (read for its statistics, never carried to an output)."""
        from umtam.adam_import import OPTIMIZER_FILE

        skip = {MODEL_FILE, STATS_FILE, SIDECAR_FILE, INDEX_FILE, OPTIMIZER_FILE, *self.weight_file_names}
        return {name: self.path / name for name in sorted(self.sidecar.files) if name not in skip}

    def check_unchanged(self, *names: str) -> None:
        """CheckpointError naming the first file (of ``names``, default all) rewritten since it was hashed.

        A stat per file: cheap enough before every tensor read. It narrows, but
        cannot close, the window in which a file truncated under a memory map
        kills the process with SIGBUS (which Python cannot catch): a truncation
        between this check and the read of the pages it removed still does.
        """
        for name in names or tuple(self.identities):
            recorded = self.identities.get(name)
            if recorded is None:
                continue
            now = current_identity(self.path / name)
            change = "it was removed" if now is None else recorded.difference(now)
            if change:
                raise changed_error(self.path / name, change)


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint directory, validating its sidecar and (by default) its files.

    ``verify`` checks every listed file's sha256 (recording its identity) and
    opens the weights and statistics, so a loaded checkpoint's files can be
    read as they are.
    """
    directory = Path(path)
    try:
        exists, is_dir, is_link = directory.exists(), directory.is_dir(), directory.is_symlink()
    except OSError as exc:  # e.g. a name too long for the file system
        raise CheckpointError(f"{directory}: cannot open ({first_line(exc, 200)})") from exc
    if not exists and is_link:
        raise CheckpointError(f"{directory}: a symbolic link to {directory.readlink()}, which does not resolve "
                              "(it is dangling or a loop)")
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
    identities = {}
    if verify:
        identities = verify_files(directory, sidecar)
        _check_weights_listed(directory, sidecar)
        with open_weights(directory):  # every shard opened, and each holds what the index says
            pass
        if STATS_FILE in sidecar.files:
            with open_safetensors(directory / STATS_FILE):
                pass
    return Checkpoint(directory, sidecar, identities)


def _check_weights_listed(directory: Path, sidecar: Sidecar) -> None:
    """Every weight file (the shards an index names too) is listed, so its sha256 was checked."""
    for name in weight_files(directory):
        if name not in sidecar.files:
            raise CheckpointError(f"{directory / name}: a weight file {SIDECAR_FILE} does not list (its sha256 "
                                  "is unchecked)", hint=_MODIFIED)


def _not_a_checkpoint_hint(directory: Path) -> str:
    if (directory / STATE_MARKER).is_file() or any(directory.glob(f"step-*/{STATE_MARKER}")):
        return f"it is a training state; continue it with: umtam train --resume {directory}"
    return "it may be a plain Hugging Face model or an interrupted write"


def verify_files(directory: Path, sidecar: Sidecar) -> dict[str, FileIdentity]:
    """Check every listed file (see the module docstring) and return each one's identity, by name."""
    identities = {}
    for name, record in sidecar.files.items():
        file_path = directory / name
        if not os.path.lexists(file_path):
            raise CheckpointError(f"{file_path}: listed in {SIDECAR_FILE} but missing")
        size = check_regular_file(file_path).st_size
        # Bounded work: a file far larger than recorded (a sparse terabyte) cannot match; say so unread.
        if "bytes" in record.model_fields_set and size > record.bytes + SIZE_SLACK:
            raise CheckpointError(f"{file_path}: sha256 mismatch (the file has {size} bytes, {SIDECAR_FILE} "
                                  f"lists {record.bytes}; not read)", hint=_MODIFIED)
        actual, identities[name] = hash_identified(file_path)
        if actual != record.sha256:
            raise CheckpointError(
                f"{file_path}: sha256 mismatch (sidecar {record.sha256[:12]}..., file {actual[:12]}...)",
                hint=_MODIFIED,
            )
    return identities


_MODIFIED = "the file was modified or truncated after the checkpoint was written"


def write_checkpoint(
    output: str | Path,
    *,
    tensors: Mapping[str, Any] | Callable[[Path], Any],
    sidecar: Sidecar | Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    stats: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes | Path | Callable[[], bytes]] | None = None,
    force: bool = False,
    inputs: Sequence[Checkpoint] = (),
    shard_bytes: int | None = None,
) -> Checkpoint:
    """Write a checkpoint atomically and return it.

    ``sidecar`` holds everything but ``schema_version`` and ``files``, which are
    filled in here from what was actually written; it may be a callable, called
    once the weights are written (as may an ``extra_files`` value). ``tensors`` is a mapping, or
    a callable that writes the weight files into the staging directory it is
    given (a streaming merge, umtam.shards.WeightsWriter); with ``shard_bytes``
    a mapping is written in shards of at most that many bytes. ``extra_files`` maps a bare
    file name to bytes or to a regular file to copy (config.json, tokenizer
    files). ``inputs`` are the checkpoints the tensors came from: tensors read
    from a memory map are read again as they are written, so each input is
    checked unchanged (``Checkpoint.check_unchanged``) once the payload is on
    disk, before the sidecar seals it. Without ``force`` an output another
    process wrote meanwhile is left alone and this write fails.
    """
    out = check_output_dir(output, force=force)

    def fill(staging: Path) -> Sidecar:
        known = _write_payload(staging, tensors, stats, extra_files or {}, shard_bytes)
        for checkpoint in inputs:
            checkpoint.check_unchanged()
        recorded = sidecar() if callable(sidecar) else sidecar  # a streaming merge knows it once written
        fields = recorded.as_json() if isinstance(recorded, Sidecar) else dict(recorded)
        complete = make_sidecar({**fields, "schema_version": SCHEMA_VERSION, "files": file_records(staging, known)},
                                staging / SIDECAR_FILE)
        write_sidecar(staging / SIDECAR_FILE, complete)
        return complete

    return Checkpoint(out, write_directory(out, fill, replace=force))


def _write_payload(staging: Path, tensors, stats, extra_files, shard_bytes: int | None) -> dict[str, str]:
    """Write every file; the sha256 of those whose writer hashed them as it wrote (a streaming merge's)."""
    known = {}
    if callable(tensors):
        known = tensors(staging) or {}
    elif shard_bytes is None:
        save_tensors(tensors, staging / MODEL_FILE)
    else:
        write_weights(staging, tensors, shard_bytes)
    if stats:
        save_tensors(stats, staging / STATS_FILE)
    for name, content in extra_files.items():
        if not is_plain_file_name(name):
            raise ValueError(f"extra file name {name!r} must be a bare file name")
        if callable(content):  # made from what the weights' writing found out (a merge's model card)
            content = content()
        if isinstance(content, bytes):
            (staging / name).write_bytes(content)
        else:
            copy_regular_file(Path(content), staging / name)  # never a link out, a FIFO or a device
    return known
