"""Click options generated from the schemas (umtam.config): no option is declared twice.

``schema_options(TrainConfig)`` adds one click option (or argument) per schema
field, in declaration order: the flag, type, choices and help come from the
field, and the help's ``[default: ...]`` is rendered from the field's default,
so it cannot drift. Every option defaults to None ("not given"), so a recipe
(``--config``) stays in charge of what the command line does not say; the
schema's loader (``build_config``) then applies defaults and validates.

Merge methods' options become flags too (``method_options``): the union of
every registered method's option keys, each flag's help naming the methods
that take it.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Callable, Iterable, Literal

import click

from umtam.config.schema import OptionInfo, Schema

# Prefix of the click parameter names of merge-method flags (``lambda`` is a Python keyword).
METHOD_OPTION_PREFIX = "method_option_"


def settings_from(schema: type[Schema], config_file: str | None, flags: dict[str, Any]) -> Schema:
    """A command's settings: its recipe (``--config``, if given) under the options given on the line."""
    from umtam.config import build_config, load_recipe

    recipe = load_recipe(config_file) if config_file else {}
    return build_config(schema, recipe, flags=flags, source=config_file or "options")


def schema_options(schema: type[Schema], *, exclude: Iterable[str] = ()) -> Callable:
    """A decorator adding every command-line field of ``schema`` as a click option or argument."""
    excluded = set(exclude)
    params = [_param(name, info, schema.model_fields[name]) for name, info in schema.options().items()
              if info.cli and name not in excluded]

    def decorate(function):
        for param in reversed(params):  # click applies decorators bottom-up
            function = param(function)
        return function

    return decorate


def _param(name: str, info: OptionInfo, field) -> Callable:
    annotation = _without_none(field.annotation)
    if info.argument:
        if typing.get_origin(annotation) is list:  # none given means "not given", as for an option
            return click.argument(name, nargs=-1, type=click.Path(), metavar=info.key.upper() + "...",
                                  callback=lambda context, parameter, value: list(value) or None)
        return click.argument(name, type=click.Path(), metavar=info.key.upper(), required=False)
    names = [*([info.short] if info.short else []), info.flag]
    help_text = f"{info.help}  {default_text(info, field.default, field.is_required())}".rstrip()
    if annotation is bool:
        return bool_flag(names, name, help_text)
    return click.option(*names, name, type=click_type(annotation), default=None, help=help_text,
                        metavar=info.metavar)


def bool_flag(names: list[str], name: str, help_text: str) -> Callable:
    """'--x' (a flag) or '--x/--no-x' (a pair); unset is None either way."""
    if any("/" in flag for flag in names):
        return click.option(*names, name, default=None, help=help_text)
    return click.option(*names, name, is_flag=True, default=None, help=help_text)


def method_options() -> Callable:
    """Flags for every merge-method option key (``--keep``, ``--lambda`` ...), naming the methods that take it."""
    from umtam.config.merge import method_option_fields
    from umtam.merge.methods import METHODS

    params = []
    for option in method_option_fields().values():
        info, annotation = option.info, _without_none(option.field.annotation)
        where = "every method" if len(option.methods) == len(METHODS) else ", ".join(option.methods)
        helps = set(option.helps.values())
        text = helps.pop() if len(helps) == 1 else " ".join(f"{m}: {h}" for m, h in option.helps.items())
        defaults = {_shown(value) for value in option.defaults.values()}
        shown = defaults.pop() if len(defaults) == 1 else ", ".join(
            f"{m} {_shown(value)}" for m, value in option.defaults.items())
        help_text = f"{text}  [{where}; default: {shown}]"
        name = METHOD_OPTION_PREFIX + info.name
        if annotation is bool:
            params.append(bool_flag([info.flag], name, help_text))
        else:
            params.append(click.option(info.flag, name, type=click_type(annotation), default=None, help=help_text,
                                       metavar=info.metavar))

    def decorate(function):
        for param in reversed(params):
            function = param(function)
        return function

    return decorate


def split_method_flags(flags: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the command's own flags, the method options given as flags keyed as recorded: ``lambda``)."""
    own = {key: value for key, value in flags.items() if not key.startswith(METHOD_OPTION_PREFIX)}
    methods = {key[len(METHOD_OPTION_PREFIX):].rstrip("_"): value for key, value in flags.items()
               if key.startswith(METHOD_OPTION_PREFIX) and value is not None}
    return own, methods


def click_type(annotation: Any) -> click.ParamType:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(choice) for choice in typing.get_args(annotation)])
    return {int: click.INT, float: click.FLOAT}.get(annotation, click.STRING)


def default_text(info: OptionInfo, default: Any, required: bool) -> str:
    """'[default: 8]' from the field itself (nothing for a required or unset option)."""
    if required:
        return ""
    if info.default_text is not None:
        return f"[default: {info.default_text}]"
    if isinstance(default, bool):
        names = info.flag_names
        shown = names[0] if default else (names[1] if len(names) > 1 else None)
        return f"[default: {shown}]" if shown and len(names) > 1 else ""
    if default is None:
        return ""
    return f"[default: {short_number(default)}]" if isinstance(default, float) else f"[default: {default}]"


def short_number(value: float) -> str:
    """Small numbers as learning rates are written (5e-5, 2e-4, 1e-12), others as they are (0.06, 1)."""
    if value == 0 or abs(value) >= 0.01:
        return f"{value:g}"
    mantissa, _, exponent = f"{value:.6e}".partition("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return short_number(value) if isinstance(value, float) else str(value)


def _without_none(annotation: Any) -> Any:
    """``int | None`` -> int; ``Annotated[str, ...]`` stays as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation
