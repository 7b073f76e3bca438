"""Every recipe under recipes/ validates and opens with the command that runs it.

A recipe's first line says what reads it: `umtam train`, `umtam merge`, or a
sweep script under bench/ (whose own loader validates it).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from umtam.config import build_config, load_recipe
from umtam.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def command_of(recipe: Path) -> str:
    return recipe.read_text().splitlines()[0]


def test_there_are_recipes_for_the_paper_runs():
    names = {path.name for path in RECIPES}
    experts = {f"expert-{task}-{optimizer}.yaml" for task in ("rte", "mrpc", "cola", "sst2", "stsb")
               for optimizer in ("adamw", "umtam")}
    assert experts <= names and {"prune-sweep.yaml", "merge-sweep.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: str(path.relative_to(ROOT / "recipes")))
def test_recipe_opens_with_its_command(recipe):
    first = command_of(recipe)
    relative = recipe.relative_to(ROOT).as_posix()
    # a profile (bench/experts.py --profile) lays options over other recipes, and says so
    assert first.startswith(("# umtam ", "# python bench/")) and (
        f"--config {relative}" in first or f"--profile {relative}" in first)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: str(path.relative_to(ROOT / "recipes")))
def test_recipe_validates(recipe):
    first = command_of(recipe)
    if first.startswith("# umtam train"):
        config = build_config(TrainConfig, load_recipe(recipe), {"output": "unused"}, source=str(recipe))
        assert config.task
    elif first.startswith("# umtam merge"):
        from umtam.merge import get_method

        options = load_recipe(recipe)
        spec = get_method(options.pop("method", "umtam"))
        options.pop("base", None)
        assert spec.resolve_options(options)  # unknown names and bad values raise ConfigError
    else:
        script = first.split("bench/")[1].split(".py")[0]
        sys.path.insert(0, str(ROOT / "bench"))
        try:
            module = importlib.import_module(script)
            assert (module.load_profile(str(recipe)) if "--profile" in first else module.load_sweep(recipe))
        finally:
            sys.path.remove(str(ROOT / "bench"))


def test_ci_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parents[1]
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (root / "README.md").read_text()
    assert ci_command.endswith("python -m pytest -q tests --slow")
    assert f"\n    {ci_command}\n" in readme
