"""Typed run configuration: defaults, then a YAML recipe, then explicit flags.

A recipe is a YAML mapping whose keys are the subcommand's option names
(dashes or underscores). Unknown keys, wrong types and bad values are all
reported at once, each with a close match when there is one, in one
ConfigError.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from umtam.errors import ConfigError, first_line


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a flat mapping of option name -> value."""
    import yaml

    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise ConfigError(f"recipe {recipe_path} does not exist")
    try:
        payload = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {recipe_path}: not valid YAML ({first_line(exc)})") from exc
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise ConfigError(f"recipe {recipe_path}: must be a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in payload.items()}


def build_config(cls, *layers: Mapping[str, Any], source: str = "options"):
    """Instantiate dataclass ``cls`` from layered mappings (later layers win).

    ``None`` values in a layer mean "not given" so that unset flags do not
    override a recipe. Every problem is collected before raising.
    """
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    merged: dict[str, Any] = {}
    problems: list[str] = []
    for layer in layers:
        for key, value in layer.items():
            name = key.replace("-", "_")
            if name not in fields:
                problems.append(_unknown_key_message(name, fields))
            elif value is not None:
                merged[name] = value
    for name, value in list(merged.items()):
        try:
            merged[name] = _coerce(value, hints[name])
        except (TypeError, ValueError):
            problems.append(f"{name}: expected {_type_name(hints[name])}, got {value!r}")
    missing = [name for name, field in fields.items() if _required(field) and name not in merged]
    problems.extend(f"{name}: required" for name in missing)
    if problems:
        raise ConfigError(f"invalid {source}: " + "; ".join(problems))
    config = cls(**merged)
    validate = getattr(config, "validate", None)
    if validate is not None:
        problems = validate()
        if problems:
            raise ConfigError(f"invalid {source}: " + "; ".join(problems))
    return config


def _unknown_key_message(name: str, fields: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(fields), n=1)
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown option {name!r}{suggestion}"


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _coerce(value: Any, annotation: Any) -> Any:
    """Accept a value of the annotated type; ints widen to floats, nothing else converts."""
    options = _union_members(annotation)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if option is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
    raise TypeError(f"{value!r} does not match {annotation!r}")


def _union_members(annotation: Any) -> tuple:
    members = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if origin is tuple:
        return (tuple,)
    return tuple(getattr(member, "__origin__", member) for member in members) if members else (annotation,)


def _type_name(annotation: Any) -> str:
    names = [getattr(member, "__name__", str(member)) for member in _union_members(annotation)]
    return " or ".join("null" if name == "NoneType" else name for name in names)
