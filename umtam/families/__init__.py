"""Model families: what umtam must know about an architecture beyond what transformers builds.

A ``ModelFamily`` is registered once per architecture family and answers, in
one place, the questions that differ between BERT-like encoders today and
decoder LMs tomorrow:

    model_types       which config.json ``model_type`` values belong to it
    head_prefixes     the task-specific head tensors: kept per task, never pruned,
                      merged or fingerprinted as part of the base
    module_patterns   how parameter names map to module types (query, ffn_in, ...)
                      for the saliency map
    embedding_parts   name segments that mark an embedding matrix (dense state
                      with ``--dense-embeddings``, a row of its own in the map)
    layer_pattern     the regular expression whose group 1 is a parameter's layer index
    pad_token         "require": a tokenizer without a pad token is refused; "eos":
                      the end-of-sequence token pads (decoders), masked out of
                      attention and of the loss
    decoder           a causal LM: ``--task lm`` and ``sft`` train it as one

A model whose type no family claims gets ``GENERIC``: every registered
family's head prefixes and module patterns, which is what umtam did before
families existed. Adding a family is one file plus its line in the import at
the bottom of this module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from umtam.registry import Registry

# "encoder.layer.3." (BERT), "transformer.layer.3." (DistilBERT), "model.layers.3." (Llama).
ENCODER_LAYERS = r"(?:^|\.)layers?\.(\d+)(?:\.|$)"

# (module type, dotted segment runs that identify it), first match wins.
ModulePatterns = tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    head_prefixes: tuple[str, ...]
    module_patterns: ModulePatterns
    embedding_parts: tuple[str, ...] = ("embeddings",)
    pad_token: str = "require"
    layer_pattern: str = ENCODER_LAYERS
    decoder: bool = False
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())  # model names people use for it (MiniLM is a BERT)

    def is_head_key(self, key: str) -> bool:
        return key.startswith(self.head_prefixes)

    def is_embedding(self, name: str) -> bool:
        return any(part in name.split(".") for part in self.embedding_parts)

    def layer_index(self, name: str) -> int | None:
        """The layer a parameter belongs to, or None outside the layer stack (embeddings, heads)."""
        match = re.search(self.layer_pattern, name)
        if match is None:
            return None
        # the generic family's pattern is an alternation: its one matching group holds the index
        return int(next(group for group in match.groups() if group is not None))

    def module_type(self, name: str) -> str:
        """The module type of a parameter name, or "other"."""
        parts = name.split(".")
        if self.is_embedding(name):
            return "embeddings"
        for kind, runs in self.module_patterns:
            if any(_contains_run(parts, run) for run in runs):
                return kind
        return "other"


def _contains_run(parts, run) -> bool:
    # Whole segments only, so "key" does not match "monkey" and "output.dense"
    # does not match "attention.output.dense_extra".
    width = len(run)
    return any(tuple(parts[i:i + width]) == tuple(run) for i in range(len(parts) - width + 1))


FAMILIES: Registry[ModelFamily] = Registry("model family")


def family_for_type(model_type: str | None) -> ModelFamily:
    """The registered family claiming ``model_type``; GENERIC when none does (or it is unknown)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return generic_family()


def family_of(config: Any) -> ModelFamily:
    """The family of a transformers config (or a config.json mapping)."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
    return family_for_type(model_type)


def family_of_dir(directory: str | Path) -> ModelFamily:
    """The family named by a directory's config.json; GENERIC when it has none or it does not parse."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return generic_family()
    return family_of(config) if isinstance(config, dict) else generic_family()


# The heads transformers' sequence-classification classes use (score.: the decoder-based ones).
_SEQUENCE_CLASSIFICATION_HEADS = ("classifier.", "score.")


def generic_family() -> ModelFamily:
    """Every registered family's heads and module names at once: for a model no family claims."""
    families = list(FAMILIES)
    layers = "|".join(dict.fromkeys(f"(?:{f.layer_pattern})" for f in families))
    heads = (*_SEQUENCE_CLASSIFICATION_HEADS, *(p for f in families for p in f.head_prefixes))
    return ModelFamily(
        name="generic",
        model_types=(),
        head_prefixes=tuple(dict.fromkeys(heads)),
        module_patterns=tuple(pattern for f in families for pattern in f.module_patterns),
        embedding_parts=tuple(dict.fromkeys(p for f in families for p in f.embedding_parts)),
        layer_pattern=layers or ENCODER_LAYERS,
        summary="any other model: the union of the registered families' names",
    )


def is_head_key(key: str) -> bool:
    """A task-head tensor of any registered family (for callers that do not know the family)."""
    return generic_family().is_head_key(key)


from umtam.families import encoders  # noqa: E402,F401,I001  (registers BERT, RoBERTa, DistilBERT)
from umtam.families import decoders  # noqa: E402,F401  (registers GPT-2, Llama, Mistral, Qwen2)
