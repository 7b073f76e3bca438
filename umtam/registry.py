"""Registries by name: optimizers, tasks, model families, merge methods, saliency scores.

Every extensible part of umtam is a ``Registry`` of small specs. Registering a
name twice is a bug (ValueError at import time); asking for an unknown name is
the user's mistake, a ConfigError that lists the choices and the close match.
Specs hold data and names of functions, never heavy imports, so the command
line can list and validate choices without importing torch.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from umtam.errors import ConfigError

T = TypeVar("T")


def unknown_choice_message(what: str, given: object, choices: Sequence[str], *, match: object = None) -> str:
    """'unknown X 'foo'; choose one of a, b (did you mean 'fo'?)': the one "did you mean" of umtam.

    ``match`` is what to compare with the choices when it differs from what was given (a normalised name).
    """
    suggestion = did_you_mean(given if match is None else match, choices)
    return f"unknown {what} {given!r}; choose one of {', '.join(choices)}{suggestion}"


def did_you_mean(given: object, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(str(given), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Generic[T]):
    """Named specs of one kind, in registration order.

    ``normalise`` maps what a user types to a registered name ("SST-2" ->
    "sst2"); ``name_of`` reads a spec's name.
    """

    def __init__(self, what: str, *, name_of: Callable[[T], str] = lambda spec: spec.name,
                 normalise: Callable[[str], str] = lambda name: name):
        self.what = what
        self._name_of = name_of
        self._normalise = normalise
        self._specs: dict[str, T] = {}

    def register(self, spec: T) -> T:
        name = self._name_of(spec)
        if name in self._specs:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> T:
        key = self._normalise(name) if isinstance(name, str) else name
        if key not in self._specs:
            raise ConfigError(unknown_choice_message(self.what, name, self.names(), match=key))
        return self._specs[key]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalise(name) in self._specs

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def __iter__(self) -> Iterator[T]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)
