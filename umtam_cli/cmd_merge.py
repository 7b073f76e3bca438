"""umtam merge: combine checkpoints fine-tuned from one base, streaming tensor by tensor."""

from __future__ import annotations

import click

from umtam.config.merge import MergeConfig
from umtam_cli.options import method_options, schema_options, split_method_flags
from umtam_cli.render import (common_output_options, emit_json, human_bytes, per_tensor_progress,
                              progress_renderer, recipe_option, stdout_console)

EXAMPLES = """\b
Examples:
  umtam merge runs/mrpc runs/sst2 -o merged/                       # method umtam, keep 0.2
  umtam merge runs/mrpc runs/sst2 runs/rte --keep 0.1 --lambda 1.2 -o merged/
  umtam merge runs/* --method ties --keep 0.2 --scope tensor --agg mean -o merged-ties/
  umtam merge runs/* --method dare-ties --drop 0.9 --seed 1 -o merged-dare/
  umtam merge runs/* --method umtam --trim magnitude --no-elect --weights uniform -o ablation/
  umtam merge runs/* --method ota --option graft=curvature -o merged-ota/
  umtam merge runs/mrpc runs/sst2 --dry-run --json
  umtam merge runs/mrpc hf/sst2-finetuned --method ties --base base/ --task-names sst2 -o merged/
  umtam merge llama-a/ llama-b/ --base llama-base/ --method ties --out-dtype bf16 --out-shard-size 5GB -o m/
  umtam merge trainer/a/checkpoint-500 trainer/b/checkpoint-500 --base base/ --method ota -o m/

\b
A plain Hugging Face directory (config.json + model.safetensors or shards, no
umtam.json) may be an input: it needs --base (the model it was fine-tuned from;
it must have the same tensors and lie close to it), a task name (--task-names, one
per plain input in order, or its config's finetuning_task; a causal LM is
lm:<directory name>) and a method that needs no training statistics (average,
task-arithmetic, ties, dare, dare-ties), unless it holds a Trainer's optimizer.pt:
then Adam's second moments are its statistics and ota, umtam and fisher run too.
The output streams to disk tensor by tensor (one model.safetensors, or shards with
--out-shard-size), in the inputs' dtype unless --out-dtype says otherwise, with
config, tokenizer and generation files and a README.md model card beside it.

"""


def epilog() -> str:
    """The examples above, then every registered method with its paper (the flags list their options)."""
    from umtam.merge.methods import METHODS

    methods = "\n".join(f"  {spec.name:16} {spec.summary}" for spec in METHODS)
    return f"""{EXAMPLES}
\b
Methods (--method; each takes the options whose help names it, and --option KEY=VALUE):
{methods}
"""


@click.command(epilog=epilog())
@recipe_option
@schema_options(MergeConfig)
@method_options()
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="A method option by its key, the value read as YAML (--option lambda=1.2).")
@common_output_options
def command(config_file, extra, as_json, quiet, verbose, **flags):
    """Merge checkpoints fine-tuned from the same base."""
    from umtam.atomic import check_output_dir
    from umtam.config import load_recipe, parse_assignments
    from umtam.config.merge import load_merge_config
    from umtam.merge import merge_checkpoints, plan

    recipe = load_recipe(config_file) if config_file else {}
    own, method_flags = split_method_flags(flags)
    config, options = load_merge_config(recipe, parse_assignments(extra), flags={**own, **method_flags},
                                        source=config_file or "options")
    inputs = dict(method=config.method, options=options, base=config.base, task_names=config.task_names)
    if config.dry_run:
        payload = plan(config.checkpoints, **inputs).as_dict()
        emit_json(payload) if as_json else render_plan(payload)
        return
    check_output_dir(config.output, inputs=config.checkpoints, force=config.force)
    with progress_renderer(quiet=quiet, verbose=verbose) as renderer:
        renderer("status", f"merging {len(config.checkpoints)} checkpoints with {config.method}")
        written, report = merge_checkpoints(config.checkpoints, config.output, force=config.force,
                                            progress=per_tensor_progress(renderer, "merge"),
                                            out_dtype=config.out_dtype, shard_bytes=config.shard_bytes, **inputs)
    payload = {"output": str(written.path), "method": config.method, "tasks": list(written.tasks),
               "options": report.sidecar["lineage"]["options"], "plan": report.plan.as_dict()}
    if as_json:
        emit_json(payload)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(payload["options"].items()))
        stdout_console().print(f"merged {', '.join(payload['tasks'])} with {config.method} ({shown}) -> {written.path}")


def render_plan(payload: dict) -> None:
    from rich.table import Table

    table = Table(title=f"merge plan ({payload['method']})", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("inputs", "\n".join(payload["inputs"]))
    table.add_row("tasks", ", ".join(payload["tasks"]))
    table.add_row("options", ", ".join(f"{k}={v}" for k, v in sorted(payload["options"].items())))
    table.add_row("tensors", f"{payload['tensor_count']} encoder ({payload['method_tensors']} merged by the method), "
                             f"{payload['head_tensors']} head")
    table.add_row("passes", str(payload["passes"]))
    table.add_row("needs base", "yes" if payload["needs_base"] else "no")
    table.add_row("estimated peak memory", human_bytes(payload["estimated_peak_bytes"]))
    stdout_console().print(table)
    stdout_console().print("dry run: nothing written")
