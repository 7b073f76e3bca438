"""umtam eval: GLUE dev metrics for every head of a checkpoint."""

from __future__ import annotations

import click

from umtam_cli.render import common_output_options, emit_json, format_value, progress_renderer, stdout_console

EPILOG = """\b
Examples:
  umtam eval runs/mrpc --task mrpc
  umtam eval merged/ --task glue            # every task the checkpoint has a head for
  umtam eval merged/ --task glue --json | jq '.tasks.mrpc.score'
  umtam eval merged/ --holdout-fraction 0.1   # the unseen train slice, for tuning without dev
"""


@click.command(epilog=EPILOG)
@click.argument("checkpoint", type=click.Path())
@click.option("--task", default="glue", show_default=True, help="A task, a comma list, or 'glue' for all heads.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="GLUE directory (TSV or parquet layout).")
@click.option("--max-eval-samples", type=int, help="Subsample each dev set (seeded).")
@click.option("--max-length", type=int, default=128, show_default=True, help="Truncate inputs to this many tokens.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Evaluation batch size.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed for dev subsampling.")
@click.option("--holdout-fraction", type=float, default=0.0,
              help="Evaluate the fixed holdout slice of train (as kept by train --holdout-fraction) instead of dev.")
@common_output_options
def command(checkpoint, task, data_dir, max_eval_samples, max_length, batch_size, seed, holdout_fraction, as_json,
            quiet, verbose):
    """Evaluate a checkpoint on GLUE dev sets."""
    from umtam.checkpoint import load_checkpoint
    from umtam.errors import ConfigError
    from umtam.evaluate import evaluate_checkpoint

    for name, value in (("--max-eval-samples", max_eval_samples), ("--max-length", max_length),
                        ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    ckpt = load_checkpoint(checkpoint)
    with progress_renderer(quiet=quiet, verbose=verbose) as progress:
        results = evaluate_checkpoint(ckpt, task, data_dir=data_dir, max_eval_samples=max_eval_samples,
                                      max_length=max_length, batch_size=batch_size, seed=seed,
                                      holdout_fraction=holdout_fraction, progress=progress)
    payload = {"checkpoint": str(ckpt.path), "kind": ckpt.kind, "tasks": results,
               "average_score": sum(r["score"] for r in results.values()) / len(results)}
    if as_json:
        emit_json(payload)
    else:
        render_eval(payload)


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
    console.print(f"average score {payload['average_score']:.4f}")
