"""umtam train: fine-tune one task and write a checkpoint with curvature statistics."""

from __future__ import annotations

import click

from umtam.config.train import TrainConfig
from umtam.optim.registry import OPTIMIZERS
from umtam.tasks import TASKS
from umtam_cli.options import schema_options, short_number
from umtam_cli.render import (common_output_options, emit_json, format_value, human_bytes, progress_renderer,
                              recipe_option, stdout_console)


def epilog() -> str:
    """Examples, then the lists the registries and the schema decide (so they cannot drift)."""
    import textwrap

    resumable = ", ".join(TrainConfig.options()[name].flag_names[0] for name in TrainConfig.resumable_options())
    states = textwrap.fill(
        "Training states: --save-every N writes OUTPUT-state/step-<N>/ (or --state-dir) every N steps, each "
        "atomically (state.safetensors + umtam-state.json: weights, optimizer, tracker, scheduler, data position, "
        "loss curve, RNG, options); the newest two are kept. A state is not a checkpoint; the output is written "
        "once, at the end. --resume continues bit for bit (on CPU); options given with it must match the saved "
        f"run's, except {resumable}. A NaN or inf loss stops the run (exit 1), names the last good state and "
        "writes no checkpoint.", width=80, break_on_hyphens=False)  # a flag never splits at its hyphen
    languages = "\n".join(f"  {spec.name:10} {spec.summary}" for spec in TASKS if spec.kind == "language")
    optimizers = "\n".join(f"  {spec.name:10} {short_number(spec.default_lr):6} {spec.summary}" for spec in OPTIMIZERS)
    return f"""\b
Examples:
  umtam train --task mrpc -o runs/mrpc-adamw
  umtam train --task mrpc --optimizer umtam --rank 8 --lr 2e-4 -o runs/mrpc-umtam
  umtam train --task rte --max-steps 50 --max-eval-samples 100 -o /tmp/rte-smoke
  umtam train --config recipes/mrpc-umtam.yaml --seed 1 -o runs/mrpc-seed1
  umtam train --task mrpc --save-every 100 -o runs/mrpc      # states in runs/mrpc-state/
  umtam train --resume runs/mrpc-state                        # continue from the newest state
  umtam train --resume runs/mrpc-state --lr 2e-5              # after a NaN stop: lower the lr
  torchrun --standalone --nproc_per_node 2 -m umtam_cli train --task mrpc -o runs/mrpc-ddp
  umtam train --task lm --model smollm2-dir --data fineweb/train.jsonl --eval-data \\
      fineweb/validation.jsonl --max-length 256 --optimizer umtam -o runs/smol-lm
  umtam train --task lm --model recipes/models/gpt2-small --from-scratch --tokenizer \\
      gpt2-tokenizer --data tinyshakespeare/train.txt --holdout-fraction 0.05 -o runs/gpt2
  umtam train --task sft --model smollm2-dir --data chats.jsonl --holdout-fraction 0.1 -o runs/sft
  python tools/glue_as_choices.py --tasks sst2 --out choice && umtam train --task choice \\
      --model smollm2-dir --data choice/sst2/train.jsonl --holdout-fraction 0.1 -o runs/smol-sst2

\b
{states}

\b
Tasks: {' '.join(TASKS.names())}.
{languages}
Optimizers (--optimizer, default lr):
{optimizers}
GLUE data comes from --data-dir, else $UMTAM_DATA_DIR, else ../shared/data/glue, else the hub.
lm and sft read --data (validation: --eval-data, or --holdout-fraction of --data) and
train the causal LM itself; on a decoder (GPT-2, Llama, Mistral, Qwen2) a GLUE task gets
a sequence-classification head. --dtype bf16 needs CUDA or a CPU with native bf16.
"""


@click.command(epilog=epilog())
@recipe_option
@click.option("--resume", "resume_from", type=click.Path(file_okay=False),
              help="Continue the run saved in this state directory (its newest state) or step-N directory.")
@schema_options(TrainConfig)
@common_output_options
def command(config_file, resume_from, as_json, quiet, verbose, **flags):
    """Fine-tune a model on a GLUE task or on text, recording curvature statistics."""
    from umtam.config import build_config, load_recipe
    from umtam.distributed import from_environment
    from umtam.resume import config_for_resume
    from umtam.train import train

    recipe = load_recipe(config_file) if config_file else {}
    if resume_from:
        config = config_for_resume(resume_from, recipe, flags=flags)
    else:
        config = build_config(TrainConfig, recipe, flags=flags, source=config_file or "options")
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
    (task, record), = sidecar.tasks.items()
    return {
        "output": str(checkpoint.path),
        "task": task,
        "metrics": record.metrics,
        "optimizer": sidecar.optimizer.name,
        "steps": sidecar.steps,
        "final_loss": sidecar.training.final_loss,
        "seconds_per_step": sidecar.seconds_per_step,
        "optimizer_state_bytes": sidecar.optimizer.state_bytes,
        "peak_rss_bytes": sidecar.peak_rss_bytes,
    }


def render_train(summary: dict) -> None:
    from rich.table import Table

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
