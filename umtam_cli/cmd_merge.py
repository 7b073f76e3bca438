"""umtam merge: combine checkpoints fine-tuned from one base, streaming tensor by tensor."""

from __future__ import annotations

import click

from umtam_cli.render import (common_output_options, emit_json, human_bytes, per_tensor_progress,
                              progress_renderer, stdout_console)

EPILOG = """\b
Examples:
  umtam merge runs/mrpc runs/sst2 -o merged/                       # method umtam, keep 0.2
  umtam merge runs/mrpc runs/sst2 runs/rte --keep 0.1 --lambda 1.2 -o merged/
  umtam merge runs/* --method ties --keep 0.2 --scope tensor --agg mean -o merged-ties/
  umtam merge runs/* --method dare-ties --drop 0.9 --seed 1 -o merged-dare/
  umtam merge runs/* --method umtam --trim magnitude --no-elect --weights uniform -o ablation/
  umtam merge runs/* --method ota --option graft=curvature -o merged-ota/
  umtam merge runs/mrpc runs/sst2 --dry-run --json
  umtam merge runs/mrpc hf/sst2-finetuned --method ties --base base/ --task-names sst2 -o merged/

\b
A plain Hugging Face directory (config.json + model.safetensors, no umtam.json)
may be an input: it needs --base (the model it was fine-tuned from; it must have
the same tensors and lie close to it), a task name (--task-names, one per plain
input in order, or its config's finetuning_task) and a method that needs no
training statistics (average, task-arithmetic, ties, dare, dare-ties).

\b
Methods: average, task-arithmetic, ties, dare, dare-ties, fisher, ota, umtam.
Only the options a method takes are accepted; a wrong one is named with the choices.
"""

# flag name -> method option name; None values mean "not given", so defaults and recipes stay in charge
FLAG_OPTIONS = ("keep", "lambda_", "scope", "agg", "drop", "seed", "trim", "elect", "weights", "norms")


@click.command(epilog=EPILOG)
@click.argument("checkpoints", nargs=-1, type=click.Path())
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="YAML recipe: method, base and method options; flags win.")
@click.option("--method", help="Merge method [default: umtam].")
@click.option("--keep", type=float, help="Fraction of each task vector kept by the trim step.")
@click.option("--lambda", "lambda_", type=float, help="Scale of the merged task vector [default: 1].")
@click.option("--scope", type=click.Choice(["tensor", "global"]), help="Trim threshold per tensor or global.")
@click.option("--agg", type=click.Choice(["mean", "sum"]), help="TIES disjoint aggregation.")
@click.option("--drop", type=float, help="DARE drop probability p (survivors scaled by 1/(1-p)).")
@click.option("--seed", type=int, help="DARE seed.")
@click.option("--trim", type=click.Choice(["curvature", "magnitude"]), help="umtam: trim saliency (ablation).")
@click.option("--elect/--no-elect", default=None, help="umtam: importance-weighted sign election (ablation).")
@click.option("--weights", type=click.Choice(["curvature", "uniform"]), help="umtam: aggregation weights (ablation).")
@click.option("--norms", type=click.Choice(["average", "base"]), help="1-D parameters: average inputs or keep base.")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE", help="Any other method option.")
@click.option("--base", help="Where to find the base model, if not where the sidecars say (checked by sha256); "
                             "required with plain Hugging Face inputs.")
@click.option("--task-names", metavar="TASK[,TASK...]",
              help="Task of each plain Hugging Face input, in input order [default: its finetuning_task].")
@click.option("--output", "-o", help="Checkpoint directory to create.")
@click.option("--dry-run", is_flag=True, help="Print the plan (inputs, tensors, memory) and write nothing.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@common_output_options
def command(checkpoints, config_file, method, extra, base, task_names, output, dry_run, force, as_json, quiet,
            verbose, **flags):
    """Merge checkpoints fine-tuned from the same base."""
    from umtam.checkpoint import check_output_dir
    from umtam.errors import ConfigError
    from umtam.merge import DEFAULT_METHOD, merge_checkpoints, plan

    recipe = _load_merge_recipe(config_file)
    method = method or recipe.get("method") or DEFAULT_METHOD  # flags win over the recipe
    base = base or recipe.get("base")
    names = _task_name_list(task_names or recipe.get("task_names"))
    # the rest of the recipe is method options, also when a flag replaced one of these
    recipe = {key: value for key, value in recipe.items() if key not in ("method", "base", "task_names")}
    options = {**recipe, **_parse_extra(extra),
               **{name.rstrip("_"): value for name, value in flags.items() if value is not None}}
    if len(checkpoints) < 2:
        raise ConfigError(f"merge needs at least two checkpoints, got {len(checkpoints)}")
    if dry_run:
        payload = plan(list(checkpoints), method=method, options=options, base=base, task_names=names).as_dict()
        emit_json(payload) if as_json else render_plan(payload)
        return
    if not output:
        raise ConfigError("missing --output/-o (or pass --dry-run)")
    check_output_dir(output, inputs=checkpoints, force=force)
    with progress_renderer(quiet=quiet, verbose=verbose) as renderer:
        renderer("status", f"merging {len(checkpoints)} checkpoints with {method}")
        written, report = merge_checkpoints(list(checkpoints), output, method=method, options=options, base=base,
                                            task_names=names, force=force,
                                            progress=per_tensor_progress(renderer, "merge"))
    payload = {"output": str(written.path), "method": method, "tasks": list(written.tasks),
               "options": report.sidecar["lineage"]["options"], "plan": report.plan.as_dict()}
    if as_json:
        emit_json(payload)
    else:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(payload["options"].items()))
        stdout_console().print(f"merged {', '.join(payload['tasks'])} with {method} ({shown}) -> {written.path}")


def _load_merge_recipe(config_file: str | None) -> dict:
    from umtam.config import load_recipe

    return load_recipe(config_file) if config_file else {}


def _task_name_list(value) -> list[str] | None:
    """--task-names "a,b" (or a recipe's list) as a list; None when not given."""
    if not value:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def _parse_extra(pairs) -> dict:
    """KEY=VALUE pairs; values parsed as YAML scalars, so numbers and booleans come out typed."""
    import yaml

    from umtam.errors import ConfigError

    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option expects KEY=VALUE, got {pair!r}")
        parsed[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return parsed


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
