"""The one way umtam declares and loads options: a typed schema per command.

A schema is a pydantic model whose fields are declared with ``option``: the
default, the range (``gt``, ``ge``, ``lt``, ``le``), the type and the help text
in one place. The command line is generated from it (umtam_cli.options), a
YAML recipe loads through ``build_config`` like the flags do, the sidecar
records the fields marked ``recorded`` and resume compares them, except those
marked ``resumable``.

Why pydantic and not dataclasses with a loader of our own: it is already
installed with transformers (transformers -> typer -> pydantic), it validates
strictly (no "8" for an int, no bool for a number, no NaN or inf unless a field
allows them) and reports every problem at once with its location, and the same
machinery types the sidecar (umtam.sidecar), where fields nest.

``build_config`` layers mappings (defaults < saved run < recipe < flags; a None
value means "not given") and turns pydantic's errors into one ConfigError that
names every problem: an unknown key with its close match, a missing one, a
value outside its range with what was given. A value that came from a flag is
named as the flag (``--rank``), one from a recipe by its key (``rank``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from umtam.errors import ConfigError, first_line
from umtam.registry import did_you_mean

S = TypeVar("S", bound="Schema")

# Upper bounds of numeric options. Every number a schema declares has one, so a
# value past it is refused here, naming the flag, instead of reaching torch,
# numpy or tokenizers and failing there with a traceback (or running for ever).
SEED_LIMIT = 2**63  # torch.manual_seed takes a 64-bit int; numpy is seeded with seed % 2**32
# Steps, samples, batch sizes, tokens, ranks: int64 would do for Python and
# torch (tokenizers refuse past it), but two billion is already far past any
# data set (QQP: 364k rows), run or sequence, so a larger count is a typo. A
# rank above a weight's smaller side is clamped to that side by the optimizers.
COUNT_LIMIT = 2**31 - 1
# A scale applied to float32 tensors (lr, decay, clipping, eps): above this
# torch's float32 scalar is inf. Below it, an update that still overflows is
# reported as divergence by training, as non-finite output by merges.
FLOAT32_MAX = 3.4028234663852886e38
# These bounds are what the libraries take, not advice: a value below a field's
# lower bound is told that bound alone ("rank: must be at least 1").
LIBRARY_LIMITS = (SEED_LIMIT, COUNT_LIMIT, FLOAT32_MAX)


class Schema(BaseModel):
    """Options of one command or merge method: unknown keys refused, types strict, floats finite."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)

    @classmethod
    def options(cls) -> dict[str, "OptionInfo"]:
        """Field name -> its command-line and recording metadata, in declaration order."""
        return {name: option_info(name, info) for name, info in cls.model_fields.items()}

    def recorded(self) -> dict[str, Any]:
        """The fields a sidecar records, by their keys (``lambda``, not ``lambda_``)."""
        infos = self.options()
        return {infos[name].key: value for name, value in self.model_dump().items() if infos[name].recorded}


@dataclass(frozen=True)
class OptionInfo:
    """How one schema field appears outside Python: its key, flag, help and recording."""

    name: str  # the Python field name
    key: str  # the recipe and sidecar key (the alias, e.g. "lambda")
    help: str
    flag: str  # "--rank", or "--dense-embeddings/--lowrank-embeddings" for a negatable pair
    short: str | None = None  # "-o"
    argument: bool = False  # positional (checkpoints), not a flag
    recorded: bool = True  # written into the sidecar
    resumable: bool = False  # may differ on --resume
    saved: bool = True  # kept in a training state (False: an instruction to this invocation, e.g. --force)
    cli: bool = True  # offered as a flag (False: recipe or API only)
    default_text: str | None = None  # the help's [default: ...] when the default is computed
    metavar: str | None = None

    @property
    def flag_names(self) -> tuple[str, ...]:
        return tuple(self.flag.split("/"))


def option(default: Any = PydanticUndefined, *, help: str, flag: str | None = None, short: str | None = None,
           argument: bool = False, recorded: bool = True, resumable: bool = False, saved: bool = True,
           cli: bool = True, default_text: str | None = None, metavar: str | None = None,
           alias: str | None = None, **constraints: Any) -> Any:
    """Declare a schema field: default, range constraints, help and how it appears outside Python."""
    extra = {"umtam": dict(flag=flag, short=short, argument=argument, recorded=recorded, resumable=resumable,
                           saved=saved, cli=cli, default_text=default_text, metavar=metavar)}
    return Field(default, description=help, alias=alias, json_schema_extra=extra, **constraints)


def option_info(name: str, info: FieldInfo) -> OptionInfo:
    meta = dict((info.json_schema_extra or {}).get("umtam", {}))
    key = info.alias or name
    flag = meta.pop("flag") or "--" + key.replace("_", "-")
    return OptionInfo(name=name, key=key, help=info.description or "", flag=flag, **meta)


def _path_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A file or directory: a str, or a pathlib.Path from Python callers (kept as its str).
PathText = Annotated[str, BeforeValidator(_path_text)]


def registered(registry) -> AfterValidator:
    """A validator for a field naming an entry of ``registry`` (its unknown-name message, close match included)."""

    def check(name: str) -> str:
        if name not in registry:
            try:
                registry.get(name)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return name

    return AfterValidator(check)


# ----------------------------------------------------------------------------- loading


def build_config(schema: type[S], *layers: Mapping[str, Any], flags: Mapping[str, Any] | None = None,
                 source: str = "options") -> S:
    """Instantiate ``schema`` from layered mappings, later layers winning; every problem in one ConfigError.

    ``layers`` hold keys (recipes, a saved run); ``flags`` the parsed command
    line, keyed by field name. None means "not given" in every layer, so an
    unset flag never overrides a recipe.
    """
    infos = schema.options()
    by_key = {info.key: info for info in infos.values()} | {info.name: info for info in infos.values()}
    merged: dict[str, Any] = {}
    shown: dict[str, str] = {}  # field name -> how to name it in a message
    problems: list[str] = []
    for layer, from_flags in [*((layer, False) for layer in layers), (flags or {}, True)]:
        for raw_key, value in layer.items():
            key = str(raw_key).replace("-", "_")
            info = by_key.get(key) or by_key.get(str(raw_key))
            if info is None:
                problems.append(f"unknown option {raw_key!r}{did_you_mean(key, list(by_key))}")
            elif value is not None:
                merged[info.key] = value
                shown[info.name] = (info.key.upper() if info.argument else info.flag_names[0]) if from_flags \
                    else info.key
    try:
        config = schema.model_validate(merged)
    except ValidationError as exc:
        problems.extend(describe_errors(exc, schema, shown, flags is not None))
    if problems:
        raise ConfigError(f"invalid {source}: " + "; ".join(problems))
    return config


def describe_errors(exc: ValidationError, schema: type[Schema], shown: Mapping[str, str] | None = None,
                    name_flags: bool = False, owner: str | None = None) -> list[str]:
    """pydantic's errors as umtam's messages: 'rank: must be at least 1, got 0', one per problem.

    ``owner`` (a merge method's name) words a problem as '<owner> option keep=0.0 must be ...'.
    """
    infos = schema.options()
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else None
        info = infos.get(name) or next((i for i in infos.values() if i.key == name), None)
        what = _what_is_wrong(error, schema.model_fields.get(info.name) if info else None)
        if info is None:
            problems.append(what["text"])
            continue
        label = (shown or {}).get(info.name) or (info.flag_names[0] if name_flags else info.key)
        if info.argument and label.startswith("--"):
            label = info.key.upper()  # a positional argument has no flag
        if error["type"] == "missing":
            problems.append(f"{label}: required")
        elif owner is not None:
            problems.append(f"{owner} option {info.key}={_shown(error['input'])}: {what['text']}")
        elif what["show_input"]:
            problems.append(f"{label}: {what['text']}, got {_shown(error['input'])}")
        else:
            problems.append(f"{label}: {what['text']}")
    return problems


def _shown(value: Any, limit: int = 80) -> str:
    """The value a user gave, as Python writes it, cut short: a recipe value can be a whole document."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit on int -> str (a Python caller's)
        text = f"an int of {value.bit_length()} bits"
    return text if len(text) <= limit else text[:limit - 3] + "..."


_TYPE_NAMES = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "true or false",
               "list_type": "a list", "dict_type": "a mapping", "int_from_float": "int"}


def _what_is_wrong(error: Mapping[str, Any], field: FieldInfo | None) -> dict[str, Any]:
    kind = error["type"]
    if kind in _TYPE_NAMES:
        return {"text": f"expected {_TYPE_NAMES[kind]}", "show_input": True}
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        below = kind.startswith("greater")
        return {"text": f"must be {range_text(field, below=below)}", "show_input": True}
    if kind == "finite_number":
        return {"text": "must be a finite number", "show_input": True}
    if kind == "literal_error":
        return {"text": f"must be one of {error['ctx']['expected'].replace(' or ', ', ')}", "show_input": True}
    if kind == "value_error":
        return {"text": first_line(error["ctx"]["error"]), "show_input": False}
    return {"text": error["msg"][0].lower() + error["msg"][1:], "show_input": True}


def range_text(field: FieldInfo | None, *, below: bool = False) -> str:
    """'in (0, 1]', 'positive', 'at least 1' ... from the field's bounds.

    ``below``: the value fell under the lower bound, so an upper bound that is
    one of the LIBRARY_LIMITS is left out.
    """
    bounds = {name: getattr(item, name) for item in (field.metadata if field else [])
              for name in ("gt", "ge", "lt", "le") if getattr(item, name, None) is not None}
    low = ("(", bounds["gt"]) if "gt" in bounds else ("[", bounds["ge"]) if "ge" in bounds else None
    high = (")", bounds["lt"]) if "lt" in bounds else ("]", bounds["le"]) if "le" in bounds else None
    if below and low and high and high[1] in LIBRARY_LIMITS:
        high = None
    if low and high:
        return f"in {low[0]}{_number(low[1])}, {_number(high[1])}{high[0]}"
    if low:
        if low[1] == 0:
            return "positive" if low[0] == "(" else "non-negative"
        return f"greater than {_number(low[1])}" if low[0] == "(" else f"at least {_number(low[1])}"
    if high:
        return f"below {_number(high[1])}" if high[0] == ")" else f"at most {_number(high[1])}"
    return "in range"


def _number(value: float) -> str:
    """A bound as people write it: 1 (not 1.0), 2**63 and 2**31 - 1 (not 19 digits), 3.40282e+38."""
    if isinstance(value, int) and value >= 2**20:
        exponent = (value + 1).bit_length() - 1
        if value == 2**exponent:
            return f"2**{exponent}"
        if value + 1 == 2**exponent:
            return f"2**{exponent} - 1"
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1e16:
        return f"{value:g}"
    return str(int(value)) if isinstance(value, float) and math.isfinite(value) and value.is_integer() else str(value)


# ----------------------------------------------------------------------------- files and KEY=VALUE


# A recipe is a few hundred bytes of options; anything near this is not one.
MAX_RECIPE_BYTES = 1 << 20


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a flat mapping of option key -> value (dashes read as underscores)."""
    recipe_path = Path(path)
    where = f"recipe {recipe_path}"
    payload = parse_yaml(_recipe_text(recipe_path), where)
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise ConfigError(f"{where}: must be a mapping of option names to values, not {_yaml_kind(payload)}")
    for key in payload:
        if not isinstance(key, str):  # YAML reads `1:`, `true:` and `null:` as a number, bool and None
            raise ConfigError(f"{where}: key {key!r} is not an option name",
                              hint="keys are option names, e.g. rank or keep")
    return {key.replace("-", "_"): value for key, value in payload.items()}


def _recipe_text(path: Path) -> str:
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"recipe {path} is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise ConfigError(f"recipe {path} is {size} bytes, not a recipe",
                              hint=f"recipes are YAML option files of at most {MAX_RECIPE_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML (byte {exc.start} is not UTF-8 text)") from exc
    except OSError as exc:
        raise ConfigError(f"recipe {path}: cannot read it ({(exc.strerror or type(exc).__name__).lower()})") from exc


# Options are flat; a sweep recipe nests lists in mappings three deep. PyYAML
# builds nested nodes recursively, so a few hundred '[' exhaust Python's stack.
MAX_YAML_DEPTH = 32


# YAML 1.1 (PyYAML) reads a float only with a dot: `lr: 5e-5` would be the string '5e-5'.
# YAML 1.2, JSON and every recipe a Trainer user writes read it as a number, and so does umtam.
_EXPONENT_FLOAT = r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"


@functools.lru_cache(maxsize=1)
def _loader():
    """SafeLoader, plus floats written with an exponent and no dot (built on first use: yaml loads lazily)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_EXPONENT_FLOAT), list("-+0123456789"))
    return Loader


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` of a recipe or an option value; any problem is one ConfigError naming ``where``.

    Floats may be written with an exponent and no dot (5e-5), as in YAML 1.2.

    The events are read first, before anything is built, and two shapes are
    refused: aliases (nested ten deep, a few hundred bytes of ``&a [*a, *a]``
    expand to billions of nodes, the "billion laughs"; an option file has no
    need to repeat a value by reference) and nesting deeper than MAX_YAML_DEPTH.
    """
    import yaml

    try:
        _check_events(yaml.parse(text, Loader=_loader()), where)
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(exc)})") from exc
    except (ValueError, OverflowError) as exc:
        # a scalar the constructors cannot turn into a value: date 2020-13-45, an int of 5000 digits
        raise ConfigError(f"{where}: not valid YAML ({first_line(exc).split(';')[0]})") from exc


def _check_events(events, where: str) -> None:
    import yaml

    depth = 0
    for event in events:
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{where}: YAML alias *{event.anchor} is not allowed",
                              hint="write the value out; aliases can expand without bound")
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} deep "
                                  f"(line {event.start_mark.line + 1})", hint="options are flat")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _yaml_problem(exc: Exception) -> str:
    """'expected ',' or ']', but got '<stream end>' at line 2, column 1' (PyYAML's own text spans lines)."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return first_line(exc)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _yaml_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def parse_assignments(pairs: list[str] | tuple[str, ...], *, option: str = "--option") -> dict[str, Any]:
    """KEY=VALUE pairs; values read as YAML (aliases refused), so numbers and booleans come out typed.

    A key given twice is refused: the second would silently win.
    """
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, shown = key.strip().replace("-", "_"), f"{option} {_shown(pair)}"
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {_shown(pair)}")
        if key in parsed:
            raise ConfigError(f"{shown}: {key} is already given", hint="give each key once")
        if not value.strip():  # `--option lambda=$LAMBDA` with the variable unset would silently mean the default
            raise ConfigError(f"{shown}: no value", hint=f"write {key}=VALUE")
        parsed[key] = parse_yaml(value, shown)
    return parsed
