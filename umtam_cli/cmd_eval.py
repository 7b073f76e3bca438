"""umtam eval: GLUE dev metrics for every head of a checkpoint, or a language model's perplexity."""

from __future__ import annotations

import click

from umtam.config.evaluate import EvalConfig
from umtam_cli.options import schema_options, settings_from
from umtam_cli.render import (common_output_options, emit_json, format_value, progress_renderer, recipe_option,
                              stdout_console)

EPILOG = """\b
Examples:
  umtam eval runs/mrpc --task mrpc
  umtam eval merged/ --task glue            # every task the checkpoint has a head for
  umtam eval merged/ --task glue --json | jq '.tasks.mrpc.score'
  umtam eval merged/ --holdout-fraction 0.1   # the unseen train slice, for tuning without dev
  umtam eval runs/lm --task lm                # perplexity on the validation text it trained with
  umtam eval merged-lm/ --task lm --data ../shared/data/lm/tinyshakespeare/val.txt
"""


@click.command(epilog=EPILOG)
@recipe_option
@schema_options(EvalConfig)
@common_output_options
def command(config_file, as_json, quiet, verbose, **flags):
    """Evaluate a checkpoint on GLUE dev sets, or a language model on text."""
    from umtam.checkpoint import load_checkpoint
    from umtam.evaluate import evaluate_checkpoint
    from umtam.tasks import is_language_key, task_spec

    config = settings_from(EvalConfig, config_file, flags)
    ckpt = load_checkpoint(config.checkpoint)
    settings = config.model_dump(exclude={"checkpoint"})
    with progress_renderer(quiet=quiet, verbose=verbose) as progress:
        results = evaluate_checkpoint(ckpt, progress=progress, **settings)
    payload = {"checkpoint": str(ckpt.path), "kind": ckpt.kind, "tasks": results,
               "average_score": average_score(results)}
    metrics = {task_spec(task).metrics for task in results}
    if all(map(is_language_key, results)) and len(metrics) == 1:
        (payload["score_is"],) = metrics.pop()  # perplexity (lower is better) or choice_accuracy
    if as_json:
        emit_json(payload)
    else:
        render_eval(payload)


def average_score(results: dict) -> float | None:
    """The tasks' mean score; None where higher-is-better scores meet perplexity, which do not average."""
    from umtam.tasks import task_spec

    if len({task_spec(task).higher_is_better for task in results}) > 1:
        return None
    return sum(result["score"] for result in results.values()) / len(results)


def render_eval(payload: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{payload['checkpoint']} ({payload['kind']})")
    for column in ("task", "split", "metrics", "score", "normalized"):
        table.add_column(column, justify="left" if column in ("task", "split", "metrics") else "right")
    for task, result in payload["tasks"].items():
        for split, metrics in result["splits"].items():
            shown = ", ".join(f"{name} {format_value(value)}" for name, value in metrics.items())
            table.add_row(task, split, shown, format_value(result["score"]), format_value(result["normalized"]))
    console = stdout_console()
    console.print(table)
    if payload["average_score"] is None:
        console.print("no average: perplexity and higher-is-better scores do not average")
        return
    console.print(f"average {payload.get('score_is', 'score')} {payload['average_score']:.4f}")
