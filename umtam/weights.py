"""A model's tensors as umtam stores them, and loading them back with every name checked.

Tied weights: a model may use one tensor under two names (GPT-2's and many
Llamas' ``lm_head.weight`` is the token embedding). safetensors refuses to
store two names of one storage, and transformers saves such a model with the
tied copy left out; umtam does the same. ``model_tensors`` is the state dict
with each alias dropped, keeping the first name in state-dict order (the
embedding), and ``load_weights`` loads such tensors into a freshly built
model, whose own tying fills the alias. Statistics are keyed by parameter
names, which name a tied tensor once already (``named_parameters``).
"""

from __future__ import annotations

from typing import Any, Mapping

from umtam.errors import CheckpointError


def tied_aliases(state: Mapping[str, Any]) -> dict[str, str]:
    """alias -> the name kept for it, for every tensor of ``state`` that shares another's memory."""
    kept: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if where in kept:
            aliases[name] = kept[where]
        else:
            kept[where] = name
    return aliases


def model_tensors(model) -> dict[str, Any]:
    """The model's state dict without tied aliases: what a checkpoint stores and a fingerprint hashes."""
    state = model.state_dict()
    aliases = tied_aliases(state)
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def load_weights(model, state: Mapping[str, Any], where: str) -> None:
    """Load ``state`` (tied aliases left out) into ``model``, naming the first tensor missing, extra or misshapen."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(key for key in set(expected) & set(state)
                       if tuple(expected[key].shape) != tuple(state[key].shape))
    if missing:
        raise CheckpointError(f"{where}: no tensor {missing[0]!r} ({len(missing)} missing), which config.json's "
                              f"model needs")
    if unexpected:
        raise CheckpointError(f"{where}: tensor {unexpected[0]!r} ({len(unexpected)} unexpected) is not in "
                              f"config.json's model")
    if misshapen:
        key = misshapen[0]
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(state[key].shape)} but config.json's "
                              f"model needs {list(expected[key].shape)}")
    aliases = tied_aliases(model.state_dict())
    result = model.load_state_dict(dict(state), strict=False)
    left = sorted(set(result.missing_keys) - set(aliases))
    if left or result.unexpected_keys:  # cannot happen after the checks above; a guard against a silent half-load
        raise CheckpointError(f"{where}: tensors {left or result.unexpected_keys} did not load")
