"""The registry of merge methods, by name.

Each method lives in its own module as a ``MergeMethod``; registering a name
twice is a bug, and an unknown name is a usage error listing the choices.
"""

from __future__ import annotations

from umtam.errors import ConfigError
from umtam.saliency import unknown_choice_message

from umtam.merge import average, dare, dare_ties, fisher, ota, task_arithmetic, ties, umtam_merge
from umtam.merge.base import MergeMethod

DEFAULT_METHOD = "umtam"

_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in _METHODS:
        raise ConfigError(unknown_choice_message("merge method", name, available_methods()))
    return _METHODS[name]


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


for _module in (average, task_arithmetic, ties, dare, dare_ties, fisher, ota, umtam_merge):
    register(_module.METHOD)
