"""Evaluate checkpoints on GLUE dev sets with the official metric per task.

A trained or pruned checkpoint has one head; a merged one has one head per
task under ``heads/<task>/``. Either way each task is evaluated with a model
built from the shared encoder plus that task's own head. For merges, scores
are also reported normalised by each expert's own score (from the sidecar).
"""

from __future__ import annotations

from typing import Any

from umtam.errors import CheckpointError, ConfigError, first_line
from umtam.progress import ProgressFn, no_progress


def evaluate_model(model, features, task: str, *, pad_token_id: int, batch_size: int = 64,
                   progress: ProgressFn = no_progress) -> dict[str, float]:
    """Metrics of ``model`` on encoded ``features`` (which carry their labels).

    Batches are formed from length-sorted examples, so each pads to nearly its
    own length (about 1.5-2x faster on GLUE pairs than arrival order); the
    predictions are put back in the original order before scoring. Padding is
    masked, so only float noise in the logits depends on the grouping.
    """
    import torch

    from umtam import batching, metrics

    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))  # longest first
    predictions: list = [None] * len(features)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    progress("start", {"total": len(features), "what": f"eval {task}"})
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = batching.collate([features[i] for i in indices], pad_token_id)
            batch.pop("labels", None)
            logits = model(**{key: value.to(device) for key, value in batch.items()}).logits.float().cpu()
            values = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
            for index, value in zip(indices, values.tolist()):
                predictions[index] = value
            progress("advance", len(indices))
    progress("end", {"what": f"eval {task}"})
    model.train(was_training)
    return metrics.compute_metrics(task, predictions, [feature["labels"] for feature in features])


def resolve_tasks(checkpoint, requested: str) -> list[str]:
    """``glue`` means every task the checkpoint has a head for; otherwise a comma list."""
    available = list(checkpoint.tasks)
    if requested == "glue":
        return available
    names = [name.strip() for name in requested.split(",") if name.strip()]
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"{checkpoint.path} has no head for task(s) {', '.join(missing)}",
            hint=f"it has: {', '.join(available)}; use --task glue for all",
        )
    return names


def build_task_model(checkpoint, task: str, tensors: dict):
    """The encoder plus ``task``'s head, as a transformers sequence-classification model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from umtam.families import family_of
    from umtam.heads import split_head_key

    record = checkpoint.tasks[task]
    regression = record.is_regression
    try:
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:  # transformers' ways of saying "no usable config.json"
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: not a usable model config "
                              f"({first_line(exc, 200)})") from exc
    config.num_labels = 1 if regression else len(record.label_names)
    if regression:
        config.problem_type = "regression"
    else:
        config.id2label = dict(enumerate(record.label_names))
        config.label2id = {name: index for index, name in enumerate(record.label_names)}
        config.problem_type = "single_label_classification"
    # A merge keeps every head under heads/<task>/: a bare head key there belongs to no task.
    family = family_of(config)
    state = {key: value for key, value in tensors.items() if split_head_key(key) is None
             and not (checkpoint.kind == "merge" and family.is_head_key(key))}
    for key, value in tensors.items():
        parsed = split_head_key(key)
        if parsed and parsed[0] == task:
            state[parsed[1]] = value
    model = AutoModelForSequenceClassification.from_config(config)
    _load_weights(model, state, checkpoint, task)
    return model


def _load_weights(model, state: dict, checkpoint, task: str) -> None:
    """Load ``state`` into ``model``, naming the first tensor that is missing, extra or misshapen."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(key for key in set(expected) & set(state)
                       if tuple(expected[key].shape) != tuple(state[key].shape))
    where = f"{checkpoint.model_file} (task {task})"
    if missing:
        raise CheckpointError(f"{where}: no tensor {missing[0]!r} ({len(missing)} missing), which config.json's "
                              f"model needs")
    if unexpected:
        raise CheckpointError(f"{where}: tensor {unexpected[0]!r} ({len(unexpected)} unexpected) is not in "
                              f"config.json's model")
    if misshapen:
        key = misshapen[0]
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(state[key].shape)} but config.json's "
                              f"model needs {list(expected[key].shape)}")
    model.load_state_dict(state, strict=True)


def evaluate_checkpoint(checkpoint, *, progress: ProgressFn = no_progress, **settings: Any) -> dict[str, Any]:
    """{task: {"splits": {split: metrics}, "score": float, "normalized": float | None}}.

    ``settings`` are EvalSettings' (umtam.config.evaluate: task, data_dir,
    max_eval_samples, max_length, batch_size, seed, holdout_fraction), validated
    with their declared defaults and ranges. With ``holdout_fraction`` the fixed
    holdout slice of train is evaluated instead of dev (the slice ``umtam train
    --holdout-fraction`` kept unseen), so merge and prune settings can be chosen
    without looking at dev; the normalised score then divides by the expert's
    own holdout score.
    """
    from umtam import batching, data
    from umtam.config import build_config
    from umtam.config.evaluate import EvalSettings
    from umtam.families import family_of_dir
    from umtam.models import ModelSource, load_tokenizer

    options = build_config(EvalSettings, settings, source="eval options")
    requested, holdout_fraction = options.task, options.holdout_fraction
    tasks = resolve_tasks(checkpoint, requested)
    _check_model_config(checkpoint)
    tokenizer = load_tokenizer(ModelSource(str(checkpoint.path), str(checkpoint.path), "checkpoint"),
                               family_of_dir(checkpoint.path))
    tensors = checkpoint.load_tensors()
    results: dict[str, Any] = {}
    for task in tasks:
        task_data = data.load_task(task, data_dir=options.data_dir, max_eval_samples=options.max_eval_samples,
                                   seed=options.seed, need_train=False, holdout_fraction=holdout_fraction)
        model = build_task_model(checkpoint, task, tensors)
        chosen = {"holdout": task_data.holdout} if holdout_fraction else task_data.eval
        splits = {
            split: evaluate_model(model, batching.encode(examples, tokenizer, options.max_length), task,
                                  pad_token_id=tokenizer.pad_token_id, batch_size=options.batch_size,
                                  progress=progress)
            for split, examples in chosen.items()
        }
        reference = "expert_holdout_metrics" if holdout_fraction else "expert_metrics"
        try:
            normalized = normalized_score(task, splits, checkpoint.tasks[task].as_json(), reference)
        except (ValueError, TypeError) as exc:  # the expert's recorded metrics lack this task's metric
            raise CheckpointError(f"{checkpoint.path / 'umtam.json'}: tasks.{task}.{reference} gives no "
                                  f"{task} score ({first_line(exc, 200)})") from exc
        results[task] = {"splits": splits, "score": task_score(task, splits), "normalized": normalized}
    return results


def _check_model_config(checkpoint) -> None:
    """config.json must be a JSON object before transformers reads it (its errors blame the hub)."""
    import json

    path = checkpoint.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", hint="eval builds the model from the checkpoint's config.json") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({first_line(exc, 200)})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: must be a JSON object")


def task_score(task: str, splits: dict[str, dict[str, float]]) -> float:
    """The GLUE score of a task: its metrics' mean, averaged over dev splits (MNLI m/mm)."""
    from umtam import metrics

    values = [metrics.score(task, split_metrics) for split_metrics in splits.values()]
    return sum(values) / len(values)


def normalized_score(task: str, splits, record: dict[str, Any], reference: str = "expert_metrics") -> float | None:
    """Score divided by the expert's own score on the same task, when the sidecar has it."""
    expert = record.get(reference)
    if not expert:
        return None
    if reference == "expert_holdout_metrics":
        expert = {"holdout": expert}
    expert_score = task_score(task, expert)
    return task_score(task, splits) / expert_score if expert_score else None
