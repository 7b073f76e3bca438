"""Layered configuration: defaults < recipe < flags, every problem reported at once."""

from __future__ import annotations

import pytest

from umtam.config import build_config, load_recipe
from umtam.errors import ConfigError
from umtam.train import TrainConfig


def test_flags_win_over_the_recipe_and_none_means_unset():
    config = build_config(TrainConfig, {"task": "rte", "output": "a", "lr": 1e-4, "rank": 4},
                          {"lr": 3e-4, "rank": None})
    assert (config.task, config.lr, config.rank, config.epochs) == ("rte", 3e-4, 4, 3.0)


def test_ints_widen_to_floats_but_strings_do_not_convert():
    assert build_config(TrainConfig, {"task": "rte", "output": "a", "epochs": 2}).epochs == 2.0
    with pytest.raises(ConfigError, match="rank: expected int"):
        build_config(TrainConfig, {"task": "rte", "output": "a", "rank": "8"})


def test_every_problem_is_reported_with_suggestions():
    with pytest.raises(ConfigError) as caught:
        build_config(TrainConfig, {"task": "rte", "learning_rat": 1.0, "rank": 0, "lr": -1.0})
    message = str(caught.value)
    assert "unknown option 'learning_rat'" in message
    assert "output: required" in message
    # validate() runs only once the types are right, so the range problems come in a second pass
    with pytest.raises(ConfigError) as caught:
        build_config(TrainConfig, {"task": "rte", "output": "a", "rank": 0, "lr": -1.0})
    assert "rank: must be at least 1, got 0" in str(caught.value)
    assert "lr: must be positive, got -1.0" in str(caught.value)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'max_length'"):
        build_config(TrainConfig, {"task": "rte", "output": "a", "max_lenght": 3})


def test_recipe_keys_accept_dashes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: mrpc\nmax-length: 64\n")
    assert load_recipe(recipe) == {"task": "mrpc", "max_length": 64}


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "must be a mapping"), ("a: [1\n", "not valid YAML")])
def test_bad_recipes(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_recipe(recipe)


def test_a_float_with_an_exponent_and_no_dot_is_a_number_as_in_yaml_1_2(tmp_path):
    # PyYAML's YAML 1.1 reads `lr: 5e-5` as the string '5e-5'; every Trainer recipe writes rates that way
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: mrpc\nlr: 5e-5\nweight-decay: 1E-2\nmax-steps: 100\nwarmup-ratio: .06\nseed: 0x10\n")
    assert load_recipe(recipe) == {"task": "mrpc", "lr": 5e-5, "weight_decay": 0.01, "max_steps": 100,
                                   "warmup_ratio": 0.06, "seed": 16}
    config = build_config(TrainConfig, load_recipe(recipe), {"output": "a"})
    assert (config.lr, config.weight_decay) == (5e-5, 0.01)
    from umtam.config.schema import parse_yaml

    assert [parse_yaml(text, "x") for text in ("-2.5e+3", "1_000e2", "[1e-3, 2]")] == [-2500.0, 1e5, [0.001, 2]]
    assert [parse_yaml(text, "x") for text in ("1e", "e5", "5e-5x", "v1e5")] == ["1e", "e5", "5e-5x", "v1e5"]
