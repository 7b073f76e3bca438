"""umtam train: fine-tune one task and write a checkpoint with curvature statistics."""

from __future__ import annotations

import click

from umtam_cli.render import common_output_options, emit_json, format_value, progress_renderer, stdout_console

EPILOG = """\b
Examples:
  umtam train --task mrpc -o runs/mrpc-adamw
  umtam train --task mrpc --optimizer umtam --rank 8 --lr 2e-4 -o runs/mrpc-umtam
  umtam train --task rte --max-steps 50 --max-eval-samples 100 -o /tmp/rte-smoke
  umtam train --config recipes/mrpc-umtam.yaml --seed 1 -o runs/mrpc-seed1
  umtam train --task mrpc --save-every 100 -o runs/mrpc      # states in runs/mrpc-state/
  umtam train --resume runs/mrpc-state                        # continue from the newest state
  umtam train --resume runs/mrpc-state --lr 2e-5              # after a NaN stop: lower the lr
  torchrun --standalone --nproc_per_node 2 -m umtam_cli train --task mrpc -o runs/mrpc-ddp

\b
Training states: --save-every N writes OUTPUT-state/step-<N>/ (or --state-dir)
every N steps, each atomically (state.safetensors + umtam-state.json: weights,
optimizer, tracker, scheduler, data position, loss curve, RNG, options); the
newest two are kept. A state is not a checkpoint; the output is written once,
at the end. --resume continues bit for bit (on CPU); options given with it must
match the saved run's, except --output, --state-dir, --save-every, --data-dir,
--device, --eval-batch-size, --plot-loss, --force and --lr. A NaN or inf loss stops the run
(exit 1), names the last good state and writes no checkpoint.

\b
Tasks: cola sst2 mrpc stsb qqp mnli qnli rte wnli.
Optimizers: adamw adafactor galore mofasgd umtam.
GLUE data comes from --data-dir, else $UMTAM_DATA_DIR, else ../shared/data/glue, else the hub.
"""


@click.command(epilog=EPILOG)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe with the same keys; flags win.")
@click.option("--task", help="GLUE task name.")
@click.option("--output", "-o", help="Checkpoint directory to create.")
@click.option("--model", help="Hugging Face model id or local directory [default: all-MiniLM-L6-v2].")
@click.option("--optimizer", help="adamw, adafactor, galore, mofasgd or umtam [default: adamw].")
@click.option("--rank", type=int, help="Rank of the low-rank momentum / projection [default: 8].")
@click.option("--lr", type=float, help="Peak learning rate [default: per optimizer, e.g. adamw 5e-5, umtam 2e-4].")
@click.option("--epochs", type=float, help="Training epochs [default: 3].")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, help="Training batch size [default: 32].")
@click.option("--max-length", type=int, help="Truncate inputs to this many tokens [default: 128].")
@click.option("--seed", type=int, help="Seed for data order, subsampling and head init [default: 42].")
@click.option("--weight-decay", type=float, help="Decoupled weight decay [default: 0.01].")
@click.option("--beta1", type=float, help="Momentum decay [default: 0.9].")
@click.option("--beta2", type=float, help="Second-moment decay, also the tracker's [default: 0.999].")
@click.option("--warmup-ratio", type=float, help="Fraction of steps for linear warmup [default: 0.06].")
@click.option("--error-feedback/--no-error-feedback", default=None, help="UMTAM's dense error-feedback buffer [default: off].")
@click.option("--dense-embeddings/--lowrank-embeddings", default=None,
              help="UMTAM: dense AdamW state for the embedding matrices instead of low-rank [default: low-rank].")
@click.option("--max-train-samples", type=int, help="Subsample the training set (seeded).")
@click.option("--max-eval-samples", type=int, help="Subsample the dev set (seeded).")
@click.option("--holdout-fraction", type=float,
              help="Hold out this fixed fraction of train and report metrics on it (for tuning without dev).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="GLUE directory (TSV or parquet layout).")
@click.option("--device", help="auto, cpu or cuda[:N] [default: auto, CUDA when available].")
@click.option("--save-every", type=int, help="Write a resumable training state every N optimizer steps.")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where --save-every writes states [default: OUTPUT-state beside the output].")
@click.option("--resume", "resume_from", type=click.Path(file_okay=False),
              help="Continue the run saved in this state directory (its newest state) or step-N directory.")
@click.option("--plot-loss", is_flag=True, default=None,
              help="Also write loss_curve.png (per-step loss and its moving average) into the checkpoint.")
@click.option("--force", is_flag=True, default=None,
              help="Replace an existing output directory (and another run's states in the state directory).")
@common_output_options
def command(config_file, resume_from, as_json, quiet, verbose, **options):
    """Fine-tune a model on a GLUE task, recording curvature statistics."""
    from umtam.config import build_config, load_recipe
    from umtam.resume import config_for_resume
    from umtam.train import TrainConfig, train

    recipe = load_recipe(config_file) if config_file else {}
    if resume_from:
        config = config_for_resume(resume_from, recipe, options)
    else:
        config = build_config(TrainConfig, recipe, options, source=config_file or "options")
    from umtam.distributed import from_environment

    main_rank = from_environment().is_main  # under torchrun, rank 0 alone reports
    with progress_renderer(quiet=quiet or not main_rank, verbose=verbose and main_rank) as progress:
        result = train(config, progress=progress, resume_from=resume_from)
    if result is None:
        return
    summary = train_summary(result)
    if as_json:
        emit_json(summary)
    else:
        render_train(summary)


def train_summary(checkpoint) -> dict:
    sidecar = checkpoint.sidecar
    (task, record), = sidecar["tasks"].items()
    return {
        "output": str(checkpoint.path),
        "task": task,
        "metrics": record["metrics"],
        "optimizer": sidecar["optimizer"]["name"],
        "steps": sidecar["steps"],
        "final_loss": sidecar["training"]["final_loss"],
        "seconds_per_step": sidecar["seconds_per_step"],
        "optimizer_state_bytes": sidecar["optimizer"]["state_bytes"],
        "peak_rss_bytes": sidecar["peak_rss_bytes"],
    }


def render_train(summary: dict) -> None:
    from rich.table import Table

    from umtam_cli.render import human_bytes

    table = Table(title=f"{summary['task']} -> {summary['output']}")
    table.add_column("split")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for split, metrics in summary["metrics"].items():
        for name, value in metrics.items():
            table.add_row(split, name, format_value(value))
    console = stdout_console()
    console.print(table)
    console.print(
        f"{summary['optimizer']}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['seconds_per_step']:.3f} s/step, optimizer state {human_bytes(summary['optimizer_state_bytes'])}, "
        f"peak RSS {human_bytes(summary['peak_rss_bytes'])}"
    )
