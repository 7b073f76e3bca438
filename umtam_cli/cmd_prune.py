"""umtam prune: keep the most salient task-vector entries, reset the rest to the base."""

from __future__ import annotations

import click

from umtam_cli.render import (common_output_options, emit_json, per_tensor_progress, progress_renderer,
                              stdout_console)

EPILOG = """\b
Examples:
  umtam prune runs/mrpc --keep 0.05 -o runs/mrpc-5pct
  umtam prune runs/mrpc --keep 0.2 --score magnitude --scope tensor -o runs/mrpc-mag20
  umtam prune runs/mrpc --keep 0.1 --base path/to/all-MiniLM-L6-v2 -o runs/mrpc-10pct --json
"""


@click.command(epilog=EPILOG)
@click.argument("checkpoint", type=click.Path())
@click.option("--keep", type=float, required=True, help="Fraction of task-vector entries to keep, in (0, 1].")
@click.option("--score", default="curvature", show_default=True,
              help="Saliency: curvature (T^2 sqrt(R C)), magnitude (T^2), fisher, second-moment.")
@click.option("--scope", default="global", show_default=True, type=click.Choice(["global", "tensor"]),
              help="One threshold over all 2-D weights, or one per tensor.")
@click.option("--base", help="Where to find the base model, if not where the sidecar says (checked by sha256).")
@click.option("--output", "-o", required=True, help="Checkpoint directory to create.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@common_output_options
def command(checkpoint, keep, score, scope, base, output, force, as_json, quiet, verbose):
    """Prune a checkpoint's task vector by saliency."""
    from umtam.checkpoint import check_output_dir, load_checkpoint
    from umtam.prune import write_pruned
    from umtam.saliency import check_keep, get_score

    check_keep(keep)
    get_score(score)
    check_output_dir(output, inputs=[checkpoint], force=force)
    ckpt = load_checkpoint(checkpoint)
    with progress_renderer(quiet=quiet, verbose=verbose) as renderer:
        renderer("status", f"pruning {ckpt.path} to {keep:g} by {score} ({scope})")
        written, report = write_pruned(ckpt, output, keep=keep, score=score, scope=scope, base=base, force=force,
                                       progress=per_tensor_progress(renderer, "prune"))
    payload = {"output": str(written.path), "input": str(ckpt.path), **report.as_dict()}
    if as_json:
        emit_json(payload)
    else:
        threshold = payload.get("threshold")
        shown = f", threshold {threshold:.3e}" if isinstance(threshold, float) else ""
        stdout_console().print(
            f"kept {payload['kept_fraction']:.4f} of task-vector entries ({payload['kept_entries']:,} of "
            f"{payload['total_entries']:,}) by {score} saliency, {scope} scope{shown} -> {written.path}"
        )
