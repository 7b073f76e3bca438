"""`umtam merge`'s options: the command's own, and the chosen method's (declared in its module).

A merge recipe or command line mixes both: the keys of ``MergeConfig``
(method, base, task_names, output ...) and the method's options (keep,
lambda ...). ``load_merge_config`` splits them, validates the first with this
schema and the rest with the method's, and reports every problem of both at
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from pydantic import BeforeValidator, field_validator, model_validator
from pydantic.fields import FieldInfo

from umtam.config.output import WeightsOutput
from umtam.config.schema import OptionInfo, PathText, build_config, option, registered
from umtam.errors import ConfigError
from umtam.merge.methods import DEFAULT_METHOD, METHODS
from umtam.tasks import normalise_task_name


def _comma_list(value: Any) -> Any:
    """"sst2,rte" (the command line) or a recipe's list, as a list of names, each named once.

    An empty entry ("a,,b", "") or a name given twice is refused rather than
    dropped: the names pair with the plain inputs in order, so a lost or
    repeated one would give an input another's task.
    """
    given = value
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return value  # None (not given), or a type the field's own check names
    if not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected task names, got {given!r}")
    names = [item.strip() for item in value]
    if not names:
        raise ValueError(f"names no task, got {given!r}")
    if not all(names):
        raise ValueError(f"empty task name in {given!r}")
    seen = set()
    for name in names:
        if normalise_task_name(name) in seen:  # "SST-2" and "sst2" are one task
            raise ValueError(f"task {name!r} given twice in {given!r}")
        seen.add(normalise_task_name(name))
    return names


class MergeConfig(WeightsOutput):
    checkpoints: list[PathText] = option(argument=True, recorded=False,
                                    help="The checkpoints to merge (umtam or plain Hugging Face directories).")
    method: Annotated[str, registered(METHODS)] = option(DEFAULT_METHOD, help="Merge method.")
    base: PathText | None = option(None, help="Where to find the base model, if not where the sidecars say (checked "
                                         "by sha256); required with plain Hugging Face inputs.")
    task_names: Annotated[list[str] | None, BeforeValidator(_comma_list)] = option(
        None, metavar="TASK[,TASK...]",
        help="Task of each plain Hugging Face input, in input order (default: its finetuning_task).")
    output: PathText | None = option(None, short="-o", help="Checkpoint directory to create.")
    dry_run: bool = option(False, flag="--dry-run", help="Print the plan (inputs, tensors, memory) and write "
                                                         "nothing.")
    force: bool = option(False, flag="--force", help="Replace an existing output directory.")

    @field_validator("checkpoints")
    @classmethod
    def _at_least_two(cls, checkpoints: list[str]) -> list[str]:
        if len(checkpoints) < 2:
            raise ValueError(f"merge needs at least two checkpoints, got {len(checkpoints)}")
        return checkpoints

    @model_validator(mode="after")
    def _output_unless_dry_run(self) -> "MergeConfig":
        if not self.output and not self.dry_run:
            raise ValueError("missing --output/-o (or pass --dry-run)")
        return self


@dataclass(frozen=True)
class MethodOption:
    """One option key across the methods: its first declaration, and each method's help and default."""

    info: OptionInfo
    field: FieldInfo
    helps: dict[str, str]  # method -> its help for the key
    defaults: dict[str, Any]  # method -> its default

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.helps)


def method_option_fields() -> dict[str, MethodOption]:
    """Every method option key (keep, lambda, ...) in registry order, for flags and help."""
    found: dict[str, MethodOption] = {}
    for spec in METHODS:
        for name, info in spec.options.options().items():
            field = spec.options.model_fields[name]
            option = found.setdefault(info.key, MethodOption(info, field, {}, {}))
            option.helps[spec.name] = info.help
            option.defaults[spec.name] = field.default
    return found


def load_merge_config(*layers: Mapping[str, Any], flags: Mapping[str, Any] | None = None,
                      source: str = "merge options") -> tuple[MergeConfig, dict[str, Any]]:
    """(MergeConfig, the method's resolved options) from recipes and flags; every problem in one ConfigError.

    A key of MergeConfig goes to it; any other key is a method option, judged by
    the chosen method's schema (an unknown one is named with the method's
    options and the close match).
    """
    fields = {info.key for info in MergeConfig.options().values()} | set(MergeConfig.model_fields)
    command_layers, method_options = [], {}
    for layer in [*layers, flags or {}]:
        command_layers.append({k: v for k, v in layer.items() if str(k).replace("-", "_") in fields})
        method_options.update({k: v for k, v in layer.items()
                               if str(k).replace("-", "_") not in fields and v is not None})
    problems, config, resolved = [], None, {}
    try:
        config = build_config(MergeConfig, *command_layers[:-1], flags=command_layers[-1], source=source)
    except ConfigError as exc:
        problems.append(exc.message.removeprefix(f"invalid {source}: "))
    method = next((layer["method"] for layer in reversed(command_layers) if layer.get("method") is not None),
                  DEFAULT_METHOD)
    if method in METHODS:  # an unknown method is already a problem; its options cannot be judged
        try:
            resolved = METHODS.get(method).resolve_options(method_options)
        except ConfigError as exc:
            problems.append(exc.message)
    if problems:
        raise ConfigError(f"invalid {source}: " + "; ".join(problems))
    return config, resolved
