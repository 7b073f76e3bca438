"""The registry of merge methods, by name.

Each method lives in its own module as a ``MergeMethod`` (its options
declared there, as a schema); registering a name twice is a bug, and an
unknown name is a usage error listing the choices. Adding a method is one file
plus its entry in the tuple below.
"""

from __future__ import annotations

from umtam.merge import average, dare, dare_ties, fisher, ota, task_arithmetic, ties, umtam_merge
from umtam.merge.base import MergeMethod
from umtam.registry import Registry

DEFAULT_METHOD = "umtam"

METHODS: Registry[MergeMethod] = Registry("merge method")


def register(method: MergeMethod) -> MergeMethod:
    return METHODS.register(method)


def get_method(name: str) -> MergeMethod:
    return METHODS.get(name)


def available_methods() -> tuple[str, ...]:
    return METHODS.names()


for _module in (average, dare, dare_ties, fisher, ota, task_arithmetic, ties, umtam_merge):  # alphabetical
    register(_module.METHOD)
