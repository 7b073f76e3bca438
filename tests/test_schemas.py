"""One declaration per option: a field added to a schema reaches the CLI, the recipe loader and the sidecar.

The schemas (umtam.config) are the only place options are declared; the click
options (umtam_cli.options), recipes (build_config) and the sidecar's record
(Schema.recorded) all read them. These tests add a field in memory, touching
nothing else, and find it in all three.
"""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from umtam.config import build_config, load_recipe, option
from umtam.config.train import TrainConfig
from umtam.errors import ConfigError
from umtam_cli.options import schema_options


class Extended(TrainConfig):
    label_smoothing: float = option(0.0, ge=0, lt=1, help="Smooth the one-hot targets by this much.")


def command_for(schema):
    """A click command generated from ``schema`` whose result is the loaded config."""
    @click.command()
    @click.option("--config", "config_file")
    @schema_options(schema)
    def command(config_file, **flags):
        recipe = load_recipe(config_file) if config_file else {}
        click.echo(build_config(schema, recipe, flags=flags).model_dump_json())

    return command


def test_a_new_field_is_a_flag_with_its_help_and_default():
    runner = CliRunner()
    help_text = " ".join(runner.invoke(command_for(Extended), ["--help"]).output.split())
    assert "--label-smoothing FLOAT Smooth the one-hot targets by this much. [default: 0]" in help_text
    result = runner.invoke(command_for(Extended), ["--task", "rte", "-o", "out", "--label-smoothing", "0.1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["label_smoothing"] == 0.1
    # the range is declared once, and the flag is named in the message
    with pytest.raises(ConfigError, match=r"--label-smoothing: must be in \[0, 1\), got 1\.5"):
        build_config(Extended, flags={"task": "rte", "output": "o", "label_smoothing": 1.5})


def test_a_new_field_loads_from_a_recipe_and_flags_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: rte\noutput: out\nlabel-smoothing: 0.2\n")
    assert build_config(Extended, load_recipe(recipe)).label_smoothing == 0.2
    runner = CliRunner()
    result = runner.invoke(command_for(Extended), ["--config", str(recipe), "--label-smoothing", "0.05"])
    assert json.loads(result.output)["label_smoothing"] == 0.05
    with pytest.raises(ConfigError, match="unknown option 'label_smoothin' \\(did you mean 'label_smoothing'\\?\\)"):
        build_config(Extended, {"task": "rte", "output": "o", "label_smoothin": 0.1})


def test_a_new_field_is_recorded_in_the_sidecar_and_compared_on_resume(tmp_path, tiny_model_dir, glue_dir):
    from umtam.train import train

    config = Extended(task="mrpc", output=str(tmp_path / "run"), model=str(tiny_model_dir), data_dir=str(glue_dir),
                      max_steps=1, batch_size=4, max_length=16, max_eval_samples=2, label_smoothing=0.1)
    written = train(config)
    recorded = json.loads((written.path / "umtam.json").read_text())["training"]["config"]
    assert recorded["label_smoothing"] == 0.1
    # a training state keeps it, and a resume that changes it is refused (it is not resumable)
    assert config.state_record()["label_smoothing"] == 0.1
    assert "label_smoothing" not in Extended.resumable_options()


def test_a_new_merge_method_option_becomes_a_merge_flag_naming_its_method(monkeypatch):
    """A method declares its options once, in its own schema: the merge command's flags come from there."""
    from umtam.merge.base import MergeMethod
    from umtam.merge.methods import METHODS
    from umtam.merge.ties import TiesOptions, ties
    from umtam_cli.options import method_options

    class SharperTies(TiesOptions):
        temperature: float = option(1.0, gt=0, help="Sharpen the elected signs.")

    monkeypatch.setattr(METHODS, "_specs", dict(METHODS._specs))
    METHODS.register(MergeMethod("sharp-ties", ties, "https://arxiv.org/abs/2306.01708", "a test method",
                                 options=SharperTies))

    @click.command()
    @method_options()
    def command(**flags):
        click.echo(json.dumps({key: value for key, value in flags.items() if value is not None}))

    helps = {param.opts[0]: param.help for param in command.params}
    assert helps["--temperature"] == "Sharpen the elected signs.  [sharp-ties; default: 1]"
    assert helps["--lambda"].endswith("[dare, dare-ties, task-arithmetic, ties, umtam, sharp-ties; default: 1]")
    assert METHODS.get("sharp-ties").resolve_options({"temperature": 2})["temperature"] == 2.0
    with pytest.raises(ConfigError, match="sharp-ties option temperature=0: must be positive"):
        METHODS.get("sharp-ties").resolve_options({"temperature": 0})
