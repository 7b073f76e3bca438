"""Every recipe under recipes/ validates and opens with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from umtam.config import build_config, load_recipe
from umtam.train import TrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_validates(recipe):
    config = build_config(TrainConfig, load_recipe(recipe), {"output": "unused"}, source=str(recipe))
    assert config.task


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_opens_with_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# umtam ") and f"--config recipes/{recipe.name}" in first


def test_ci_runs_exactly_the_readme_test_command():
    root = Path(__file__).resolve().parents[1]
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (root / "README.md").read_text()
    assert ci_command.endswith("python -m pytest -q tests")
    assert f"\n    {ci_command}\n" in readme
