"""Typed options per command (train, prune, merge, eval, inspect) and the one loader for all of them.

    from umtam.config import build_config, load_recipe
    from umtam.config.train import TrainConfig
    config = build_config(TrainConfig, load_recipe("recipes/mrpc-umtam.yaml"), flags={"seed": 1})

schema.py has the machinery (``Schema``, ``option``, ``build_config``); each
command's schema is a module of its own, and a merge method declares its
options in its own file (umtam.merge). The command line is generated from the
schemas (umtam_cli.options), never declared a second time.
"""

from umtam.config.schema import (OptionInfo, Schema, build_config, describe_errors, load_recipe, option,
                                 parse_assignments, range_text, registered)

__all__ = ["OptionInfo", "Schema", "build_config", "describe_errors", "load_recipe", "option",
           "parse_assignments", "range_text", "registered"]
