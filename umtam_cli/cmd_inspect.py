"""umtam inspect: what a checkpoint is, where it came from, what it cost, where its saliency sits."""

from __future__ import annotations

import click

from umtam.config.inspect import InspectConfig
from umtam_cli.options import schema_options, settings_from
from umtam_cli.render import (common_output_options, emit_json, format_value, human_bytes, progress_renderer,
                              recipe_option, stdout_console)

EPILOG = """\b
Examples:
  umtam inspect runs/mrpc
  umtam inspect runs/mrpc --json | jq '.optimizer.state_bytes'
  umtam inspect runs/merged                      # tasks, expert metrics, method and inputs
  umtam inspect runs/mrpc --saliency             # where the top 5% saliency sits
  umtam inspect runs/mrpc --saliency --scores curvature,fisher
  umtam inspect runs/mrpc --saliency --keep 0.01 --json | jq '.saliency.scores["curvature-row"].by_module'
  umtam inspect runs/mrpc --plot mrpc-saliency.png --base path/to/all-MiniLM-L6-v2
"""


@click.command(epilog=EPILOG)
@recipe_option
@schema_options(InspectConfig)
@common_output_options
def command(config_file, as_json, quiet, verbose, **flags):
    """Describe a checkpoint: tasks, base, stats, metrics, costs.

    A prune or merge also shows its lineage (method, options, inputs); --saliency
    or --plot adds where the top-k saliency sits by layer and module type.
    """
    from umtam.checkpoint import load_checkpoint
    from umtam.summary import summarize

    config = settings_from(InspectConfig, config_file, flags)
    if config.plot is not None:
        from umtam.saliency_map import check_plot_path

        check_plot_path(config.plot)  # no matplotlib or a bad path fails before minutes of work
    ckpt = load_checkpoint(config.checkpoint)
    keep = config.top_fraction
    with progress_renderer(quiet=quiet, verbose=verbose) as renderer:
        if config.wants_saliency:
            renderer("status", f"scoring {ckpt.path} against its base model (top {keep:g})")
        summary = summarize(ckpt, saliency=config.wants_saliency, keep=keep, base=config.base,
                            scores=config.saliency_scores)
    if config.plot is not None:
        from umtam.saliency_map import plot_breakdown

        summary["plot"] = str(plot_breakdown(summary["saliency"], config.plot, title=str(ckpt.path)))
    if as_json:
        emit_json(summary)
        return
    render_summary(summary)
    if config.wants_saliency:
        render_saliency(summary["saliency"])
    if config.plot is not None:
        stdout_console().print(f"saliency map -> {summary['plot']}", highlight=False)


def render_summary(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=summary["path"], show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    base = summary["base_model"]
    table.add_row("kind", summary["kind"])
    table.add_row("base model", f"{base.get('reference')} ({base.get('origin')}) sha256 {base['fingerprint'][:16]}...")
    params = summary["parameters"]
    table.add_row("parameters", f"{params['total']:,} ({params['encoder']:,} shared by every task, "
                                f"{params['tensors']} tensors)")
    for task, record in summary["tasks"].items():
        table.add_row(f"task {task}", _task_line(record, summary["kind"]))
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
    if summary["kind"] in ("merge", "prune") and isinstance(summary.get("lineage"), dict):
        _lineage_rows(table, summary["lineage"])
    stdout_console().print(table)


def _task_line(record: dict, kind: str) -> str:
    if "text" in record:  # a language task: no labels; the text it trained and was validated on
        labels = f"text {record['text']['train']}, validation {record['text']['validation']}"
    else:
        labels = f"{len(record['labels']) or 'regression'} labels"
    if "expert_metrics" not in record:
        return f"{labels}; {_metrics_line(record['metrics'])}"
    # A merged or pruned task: what its expert scored, and this model's own scores once evaluated.
    this_model = {"merge": "merged", "prune": "pruned"}.get(kind, "this model")
    return f"{labels}; expert {_metrics_line(record['expert_metrics'])}; {this_model} {_metrics_line(record['metrics'])}"


def _metrics_line(metrics: dict) -> str:
    # Training writes {split: {metric: value}}; older or hand-made sidecars may be flat.
    shown = "; ".join(
        f"{split}: " + ", ".join(f"{k} {format_value(v)}" for k, v in values.items())
        if isinstance(values, dict) else f"{split} {format_value(values)}"
        for split, values in (metrics or {}).items()
    )
    return shown or "-"


def _lineage_rows(table, lineage: dict) -> None:
    options = ", ".join(f"{k}={_number(v)}" for k, v in sorted(lineage["options"].items()))
    table.add_row("lineage", f"{lineage['method']} ({options})" if options else str(lineage["method"]))
    for index, item in enumerate(lineage["inputs"], start=1):
        sha = (item.get("sha256") or "")[:12]
        tasks = ", ".join(item.get("tasks") or []) or "-"
        table.add_row(f"input {index}", f"{item.get('path')} sha256 {sha}... tasks {tasks}")
    for key, value in lineage.items():
        if key not in ("method", "options", "inputs", "tasks"):
            if isinstance(value, dict):  # per-task thresholds of a global-scope merge
                value = ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            table.add_row(key.replace("_", " "), _number(value))


def _number(value) -> str:
    # Significant digits, not decimals: thresholds are tiny and would all print as 0.0000.
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def render_saliency(breakdown: dict) -> None:
    from rich.table import Table

    console = stdout_console()
    for score, record in breakdown["scores"].items():
        table = Table(title=f"{score} saliency: top {100 * breakdown['keep']:.4g}% = {record['topk_entries']:,} of "
                            f"{record['total_entries']:,} entries (threshold {record['threshold']:.3e})")
        for column in ("where", "params", "top-k entries", "top-k mass", "mass / params"):
            table.add_column(column, justify="left" if column == "where" else "right")
        for layer, group in record["by_layer"].items():
            table.add_row(f"layer {layer}" if layer.isdigit() else layer, *_share_cells(group))
        table.add_section()
        for kind, group in record["by_module"].items():
            table.add_row(kind, *_share_cells(group))
        console.print(table)
    for score, reason in breakdown["skipped"].items():
        console.print(f"{score} saliency skipped: {reason}", highlight=False)


def _share_cells(group: dict) -> tuple[str, str, str, str]:
    # mass / params > 1: the group holds more of the salient mass than its size suggests.
    lift = group["mass_share"] / group["parameters_share"] if group["parameters_share"] else 0.0
    return (f"{100 * group['parameters_share']:.1f}%", f"{100 * group['topk_share']:.1f}%",
            f"{100 * group['mass_share']:.1f}%", f"x{lift:.2f}")
