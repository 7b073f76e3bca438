"""umtam inspect: what a checkpoint is, where it came from, what it cost."""

from __future__ import annotations

import click

from umtam_cli.render import common_output_options, emit_json, format_value, human_bytes, stdout_console

EPILOG = """\b
Examples:
  umtam inspect runs/mrpc
  umtam inspect runs/mrpc --json | jq '.optimizer.state_bytes'
"""


@click.command(epilog=EPILOG)
@click.argument("checkpoint", type=click.Path())
@common_output_options
def command(checkpoint, as_json, quiet, verbose):
    """Describe a checkpoint: tasks, base, stats, metrics, costs."""
    from umtam.checkpoint import load_checkpoint
    from umtam.summary import summarize

    summary = summarize(load_checkpoint(checkpoint))
    if as_json:
        emit_json(summary)
    else:
        render_summary(summary)


def render_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=summary["path"], show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    base = summary["base_model"]
    table.add_row("kind", summary["kind"])
    table.add_row("base model", f"{base.get('reference')} ({base.get('origin')}) sha256 {base['fingerprint'][:16]}...")
    params = summary["parameters"]
    table.add_row("parameters", f"{params['total']:,} ({params['encoder']:,} encoder, {params['tensors']} tensors)")
    for task, record in summary["tasks"].items():
        metrics = "; ".join(
            f"{split}: " + ", ".join(f"{k} {format_value(v)}" for k, v in values.items())
            for split, values in record["metrics"].items()
        ) or "-"
        table.add_row(f"task {task}", f"{len(record['labels']) or 'regression'} labels; {metrics}")
    stats = ", ".join(f"{name} x{count}" for name, count in summary["stats"].items()) or "none"
    table.add_row("stats", stats)
    optimizer = summary.get("optimizer") or {}
    if optimizer:
        hparams = optimizer.get("hyperparameters", {})
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in sorted(hparams.items()))
        table.add_row("optimizer", f"{optimizer['name']} ({shown})")
        table.add_row("optimizer state", human_bytes(optimizer.get("state_bytes")))
    table.add_row("steps / seed", f"{format_value(summary['steps'])} / {format_value(summary['seed'])}")
    table.add_row("peak RSS", human_bytes(summary["peak_rss_bytes"]))
    table.add_row("time per step", f"{format_value(summary['seconds_per_step'])} s")
    for name, size in sorted(summary["files"].items()):
        table.add_row(f"file {name}", human_bytes(size))
    stdout_console().print(table)
