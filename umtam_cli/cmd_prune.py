"""umtam prune: keep the most salient task-vector entries, reset the rest to the base."""

from __future__ import annotations

import click

from umtam.config.prune import PruneConfig
from umtam_cli.options import schema_options, settings_from
from umtam_cli.render import (common_output_options, emit_json, per_tensor_progress, progress_renderer,
                              recipe_option, stdout_console)


def epilog() -> str:
    """Examples, then the scores as the registry lists them (so the help cannot drift from it)."""
    from umtam.scores import DEFAULT_SCORE, SCORES

    scores = "\n".join(f"  {spec.name:17} {spec.summary}" + ("  [default]" if spec.name == DEFAULT_SCORE else "")
                       for spec in SCORES)
    return f"""\b
Examples:
  umtam prune runs/mrpc --keep 0.05 -o runs/mrpc-5pct
  umtam prune runs/mrpc --keep 0.2 --score magnitude --scope tensor -o runs/mrpc-mag20
  umtam prune runs/mrpc --keep 0.1 --base path/to/all-MiniLM-L6-v2 -o runs/mrpc-10pct --json

\b
Scores (--score):
{scores}
"""


@click.command(epilog=epilog())
@recipe_option
@schema_options(PruneConfig)
@common_output_options
def command(config_file, as_json, quiet, verbose, **flags):
    """Prune a checkpoint's task vector by saliency."""
    from umtam.atomic import check_output_dir
    from umtam.checkpoint import load_checkpoint
    from umtam.config.prune import PruneSettings
    from umtam.prune import write_pruned

    config = settings_from(PruneConfig, config_file, flags)
    check_output_dir(config.output, inputs=[config.checkpoint], force=config.force)
    ckpt = load_checkpoint(config.checkpoint)
    settings = {name: getattr(config, name) for name in PruneSettings.model_fields}
    with progress_renderer(quiet=quiet, verbose=verbose) as renderer:
        renderer("status", f"pruning {ckpt.path} to {config.keep:g} by {config.score} ({config.scope})")
        written, report = write_pruned(ckpt, config.output, base=config.base, force=config.force,
                                       progress=per_tensor_progress(renderer, "prune"), out_dtype=config.out_dtype,
                                       shard_bytes=config.shard_bytes, **settings)
    payload = {"output": str(written.path), "input": str(ckpt.path), **report.as_dict()}
    if as_json:
        emit_json(payload)
    else:
        threshold = payload.get("threshold")
        shown = f", threshold {threshold:.3e}" if isinstance(threshold, float) else ""
        stdout_console().print(
            f"kept {payload['kept_fraction']:.4f} of task-vector entries ({payload['kept_entries']:,} of "
            f"{payload['total_entries']:,}) by {config.score} saliency, {config.scope} scope{shown} -> {written.path}"
        )
