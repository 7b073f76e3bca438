"""The base weights a checkpoint was fine-tuned from: their fingerprint, and reading them back.

Training records the base as a sidecar ``base_model`` record: where it was
found and the sha256 ``fingerprint`` of its encoder tensors (every tensor but
the task head, umtam.heads). Prune, merge and the saliency map read the base
back (``load_base_encoder``) and check it against the fingerprint, so a moved
or different base is caught instead of silently producing wrong task vectors.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from umtam import digest_cache
from umtam.atomic import in_background
from umtam.errors import CheckpointError
from umtam.families import family_of
from umtam.heads import encoder_tensors
from umtam.models import ModelSource, resolve_model
from umtam.shards import is_sharded, open_weights, weight_files

LM_HEAD = "lm_head.weight"  # a causal LM's output projection; a tied model stores none


def fingerprint(tensors: Mapping[str, Any], after: Callable[[Any], None] | None = None) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors, in name order.

    Used for the base weights: two checkpoints share a base exactly when their
    encoders started from bit-identical tensors, whatever file they came from.
    ``after`` is called with each tensor once it is hashed: a merge hands its
    memory-mapped pages back there (umtam.merge.pages), so hashing a base read
    from disk never holds more than one tensor of it.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy())  # the buffer itself, no copy
        if after is not None:
            after(tensors[name])
    return digest.hexdigest()


def weight_file_stats(source: ModelSource) -> list[os.stat_result] | None:
    """The stat of each weight file of a local base, taken before ``read_base_file`` (for file_fingerprint)."""
    try:
        directory = Path(source.location)
        return [os.stat(directory / name) for name in weight_files(directory)]
    except (OSError, CheckpointError):
        return None


def file_fingerprint(source: ModelSource, keys: Sequence[str], tensors: Mapping[str, Any],
                     release: Callable[[Any], None] | None, before: list[os.stat_result] | None) -> str:
    """``fingerprint(tensors)`` of ``read_base_file(source, keys)``'s tensors, remembered by the files' identity.

    A base merged against again is not hashed again while its weight files are
    unchanged (umtam.digest_cache); the key also names the tensors read.
    ``before`` is weight_file_stats from before the files were read: a digest
    is kept only when the files are as they were then once it is taken.
    """
    kind = "fingerprint " + hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    key = None if before is None else digest_cache.key_of(kind, before)
    digest = digest_cache.lookup(key)
    if digest is None:
        digest = fingerprint(tensors, release)
        now = weight_file_stats(source)
        if now is not None and digest_cache.key_of(kind, now) == key:
            digest_cache.store(key, digest)
    return digest


def base_record(source: ModelSource, base_encoder: Mapping[str, Any], init_seed: int, *,
                architecture: str = "sequence-classification", from_config: bool = False) -> dict[str, Any]:
    """The sidecar's description of the weights training started from.

    ``architecture`` says which model class holds them (umtam.models); with
    ``from_config`` they are not pretrained weights but the initialisation of
    the source's config.json from ``init_seed``, which rebuilds them.
    """
    record = {**source.as_record(), "fingerprint": fingerprint(base_encoder), "init_seed": init_seed,
              "architecture": architecture}
    return {**record, "from_config": True} if from_config else record


def _rebuild(source: ModelSource, record: Mapping[str, Any]):
    """The base model as training built it: pretrained, or from its config with the recorded init seed."""
    import torch

    from umtam.models import load_config, load_pretrained, model_from_config

    architecture = record.get("architecture", "sequence-classification")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(record.get("init_seed", 0)))
        if record.get("from_config"):
            return model_from_config(load_config(source), source, architecture)
        return load_pretrained(source, architecture, num_labels=2)


def _encoder_of(model) -> dict[str, Any]:
    from umtam.weights import model_tensors

    return encoder_tensors(model_tensors(model), family_of(model.config))


def load_base_encoder(record: Mapping[str, Any] | Any, *, override: str | None = None,
                      keys: Iterable[str] | None = None,
                      release: Callable[[Any], None] | None = None) -> Mapping[str, Any]:
    """Rebuild the base encoder tensors a checkpoint was fine-tuned from, and verify them.

    ``override`` (``--base``) points at another copy of the base; either way the
    tensors must hash to the recorded fingerprint, so a moved or different base
    is caught instead of silently producing wrong task vectors.

    With ``keys``, the encoder tensor names of a checkpoint fine-tuned from this
    base, a base that is a local directory with a model.safetensors is first read
    straight from that file (``read_base_file``): memory-mapped, read-only, no
    model built. It is used only when it hashes to the fingerprint; otherwise
    (a head or pooler the base file lacks and transformers initialises, legacy
    names, another dtype) the base is rebuilt through transformers as without
    ``keys``. ``release`` is fingerprint's ``after``.
    """
    record = record.as_json() if hasattr(record, "as_json") else record  # a sidecar BaseRecord
    source = _base_source(record, override)
    if keys is not None and not record.get("from_config"):
        keys, before = list(keys), weight_file_stats(source)
        direct = read_base_file(source, keys)
        if direct is not None and file_fingerprint(source, keys, direct, release, before) == record["fingerprint"]:
            return direct
    encoder = _encoder_of(_rebuild(source, record))
    if fingerprint(encoder) != record["fingerprint"]:
        raise CheckpointError(
            f"base model {source.location} does not match the recorded fingerprint "
            f"{record['fingerprint'][:12]}...",
            hint="pass the base the checkpoint was trained from with --base",
        )
    return {key: value.detach().clone() for key, value in encoder.items()}


def describe_base(record: Mapping[str, Any] | Any, override: str | None = None) -> str:
    """The base model as error messages name it: "the base model <where it was found>"."""
    record = record.as_json() if hasattr(record, "as_json") else record
    where = override or record.get("location") or record.get("reference")
    return f"the base model {where}" if where else "the base model"


def identify_base(reference: str, keys: Iterable[str], release: Callable[[Any], None] | None = None,
                  *, later: bool = False) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The base encoder at ``reference`` and a sidecar record naming it, for inputs that record no base.

    A plain Hugging Face input does not say which weights it was fine-tuned
    from, so the user names them (``--base``) and this reads them the way
    ``load_base_encoder`` will read them again from the record: straight from
    the base's safetensors file when that has every key, otherwise through
    transformers with init seed 0. The record's fingerprint therefore matches a
    later ``load_base_encoder(record, keys=keys)``. ``release`` is fingerprint's ``after``.
    With ``later`` the record's "fingerprint" is a Future, hashed on a
    background thread (umtam.atomic.in_background) while the caller reads the
    same tensors: a plain input's base is recorded, not checked, so nothing
    waits for it but the sidecar.
    """
    source = resolve_model(reference)
    keys, before = list(keys), weight_file_stats(source)
    encoder = read_base_file(source, keys)
    architecture = architecture_of_keys(keys)
    if encoder is None:
        refuse_tied_base_of_untied_head(source, keys)
        state = _encoder_of(_rebuild(source, {"architecture": architecture, "init_seed": 0}))
        encoder = {key: value.detach().clone() for key, value in state.items()}
        identify = functools.partial(fingerprint, encoder, release)
    else:
        identify = functools.partial(file_fingerprint, source, keys, encoder, release, before)
    digest = in_background(identify) if later else identify()
    record = {**source.as_record(), "fingerprint": digest, "init_seed": 0, "architecture": architecture}
    return record, encoder


def architecture_of_keys(keys: Iterable[str]) -> str:
    """"causal-lm" when the weights have an ``lm_head`` or no classification head, as a plain decoder's."""
    keys = list(keys)
    if LM_HEAD in keys:
        return "causal-lm"
    from umtam.families import generic_family

    family = generic_family()
    has_head = any(family.is_head_key(key) for key in keys)
    decoder = any(family.module_type(key) in ("qkv", "ffn_gate") or "embed_tokens" in key for key in keys)
    return "causal-lm" if decoder and not has_head else "sequence-classification"


def _base_source(record: Mapping[str, Any], override: str | None) -> ModelSource:
    reference = override or record.get("reference") or record.get("location")
    source = resolve_model(reference)
    if source.origin == "hub" and record.get("location") and Path(record["location"]).is_dir():
        source = resolve_model(record["location"])
    return source


def read_base_file(source: ModelSource, keys: Iterable[str]) -> dict[str, Any] | None:
    """The tensors ``keys`` straight from a local base's model.safetensors (or its shards), or None.

    A classifier's encoder names carry the architecture's base-model prefix
    ("bert.encoder..."), which a base saved as a bare encoder lacks
    ("encoder..."): the prefix is the first name component shared by every key,
    and a key missing from the file is looked up without it. None when the base
    is not a local directory with safetensors weights or a key is not in them.
    The tensors are read-only views of the memory-mapped file; nothing is
    checked here (the caller compares the fingerprint).
    """
    directory = local_weights_directory(source)
    if directory is None:
        return None
    keys = list(keys)
    first_parts = {key.split(".", 1)[0] for key in keys}
    prefix = f"{first_parts.pop()}." if len(first_parts) == 1 else None
    try:
        with open_weights(directory) as handle:
            available = set(handle.keys())
            names = {}
            for key in keys:
                if key in available:
                    names[key] = key
                elif prefix and key.startswith(prefix) and key[len(prefix):] in available:
                    names[key] = key[len(prefix):]
                else:
                    return None
            return {key: handle.get_tensor(name) for key, name in names.items()}
    except (CheckpointError, RuntimeError):  # unreadable here: transformers may still build the base
        return None


def local_weights_directory(source: ModelSource) -> Path | None:
    """The base's directory when it is local and holds safetensors weights (one file or shards), else None."""
    directory = Path(source.location)
    if source.origin == "hub" or not (is_sharded(directory) or (directory / "model.safetensors").is_file()):
        return None
    return directory


def refuse_tied_base_of_untied_head(source: ModelSource, keys: Sequence[str]) -> None:
    """Refuse, from the weight files' header, inputs with their own lm_head over a base whose files have none.

    Such a base ties lm_head to its token embedding. Rebuilding it through
    transformers (the only other way to read it) ties it again, so there is no
    lm_head to subtract and check_base_covers refuses, but only after the whole
    base is built: minutes for a large model. An unreadable header is left to
    transformers, as read_base_file leaves it.
    """
    directory = local_weights_directory(source)
    if LM_HEAD not in keys or directory is None:
        return
    try:
        with open_weights(directory) as handle:
            has_head = LM_HEAD in set(handle.keys())
    except (CheckpointError, RuntimeError):
        return
    if not has_head:
        raise CheckpointError(
            f"the base model {source.location} has no tensor {LM_HEAD!r} (a model that ties it to its "
            f"token embedding stores none), which the inputs have",
            hint="pass the untied base the inputs were fine-tuned from with --base",
        )


def check_base_covers(base: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], label: str,
                      dtypes: Mapping[str, Any] | None = None) -> None:
    """Every tensor of ``shapes`` (a checkpoint's, named ``label``) must be in the base, alike.

    Alike means the same shape and, for the tensors ``dtypes`` names (torch
    dtypes or safetensors names such as "F32"), the same kind of dtype
    (``dtype_kind``: floating, integer or bool; bf16 against f32 is fine).
    Prune and merge pass every encoder tensor, not only the 2-D weights they
    change: a weight stored as integers, or as a vector where the base has a
    matrix, would otherwise pass for a buffer or a 1-D parameter and be copied
    through unpruned and unmerged.
    """
    for key, shape in shapes.items():
        if key not in base:
            raise CheckpointError(f"the base model has no tensor {key!r}, which {label} has")
        if tuple(base[key].shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {key!r} has shape {list(base[key].shape)} in the base model "
                f"but {list(shape)} in {label}",
                hint="the weights were not saved from the base's architecture",
            )
        if dtypes is not None and key in dtypes:
            theirs, ours = dtype_kind(dtypes[key]), dtype_kind(base[key].dtype)
            if theirs != ours:
                raise CheckpointError(
                    f"tensor {key!r} is {theirs} ({dtype_name(dtypes[key])}) in {label} "
                    f"but {ours} ({dtype_name(base[key].dtype)}) in the base model",
                    hint="the weights were not saved from a model fine-tuned from this base",
                )


def dtype_kind(dtype: Any) -> str:
    """'floating', 'integer' or 'bool' for a torch dtype or a safetensors dtype name ("F32", "BF16", "I64")."""
    if isinstance(dtype, str):
        if dtype == "BOOL":
            return "bool"
        return "floating" if dtype.startswith(("F", "BF")) else "integer"
    if str(dtype) == "torch.bool":
        return "bool"
    return "floating" if dtype.is_floating_point else "integer"


def dtype_name(dtype: Any) -> str:
    """A dtype as a message shows it: "F32" as it is, torch.int64 as "int64"."""
    return str(dtype).removeprefix("torch.")
