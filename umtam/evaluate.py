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
    masked, so only float noise in the logits depends on the grouping. A batch
    holds at most ``batch_size`` examples, and fewer where its padded
    activations (activation_bytes) would not fit EVAL_MEMORY_FRACTION of the
    memory available (umtam.batching): ``--batch-size 1000000`` on a big dev
    set then runs in memory-sized batches instead of one that cannot fit.
    """
    import torch

    from umtam import batching, metrics

    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))  # longest first
    predictions: list = [None] * len(features)
    parameter = next(model.parameters())
    batches = _memory_capped(model, features, order, batch_size, parameter, task, progress)
    was_training = model.training
    model.eval()
    progress("start", {"total": len(features), "what": f"eval {task}"})
    with torch.inference_mode():
        for indices in batches:
            batch = batching.collate([features[i] for i in indices], pad_token_id)
            batch.pop("labels", None)
            logits = model(**{key: value.to(parameter.device) for key, value in batch.items()}).logits.float().cpu()
            values = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
            for index, value in zip(indices, values.tolist()):
                predictions[index] = value
            progress("advance", len(indices))
    progress("end", {"what": f"eval {task}"})
    model.train(was_training)
    return metrics.compute_metrics(task, predictions, [feature["labels"] for feature in features])


def _memory_capped(model, features, order, batch_size: int, parameter, task: str, progress) -> list[list[int]]:
    from umtam import batching

    available = batching.available_memory_bytes(parameter.device)
    budget = None if available is None else int(available * batching.EVAL_MEMORY_FRACTION)
    lengths = [len(feature["input_ids"]) for feature in features]
    itemsize = parameter.element_size()
    batches = batching.capped_batches(order, lengths, batch_size,
                                      lambda length: activation_bytes(model.config, length, itemsize), budget)
    largest = max((len(batch) for batch in batches), default=0)
    if largest < min(batch_size, len(features)):
        progress("status", f"eval {task}: batches of at most {largest} examples (not {batch_size}), "
                           f"so that their activations fit in {budget / 2**20:.0f} MiB of memory")
    return batches


def activation_bytes(config, length: int, itemsize: int = 4) -> int:
    """Bytes of activations one sequence of ``length`` tokens needs in an inference forward pass: an estimate.

    Under inference mode each layer's activations are freed as the next layer
    runs, so the peak is one layer's and the number of layers does not multiply
    it. Per token that is about 8 hidden-size vectors (the layer's input, query,
    key, value, attention context and output, the two residual sums), 2
    intermediate-size vectors (the feed-forward's expansion before and after
    its activation) and, per attention head, 2 rows of ``length`` scores (the
    scores and their softmax). From the config: hidden_size,
    num_attention_heads, intermediate_size (4 x hidden when absent, as BERT's).
    """
    hidden = _config_int(config, "hidden_size", 768)
    heads = _config_int(config, "num_attention_heads", 12)
    intermediate = _config_int(config, "intermediate_size", 4 * hidden)
    return itemsize * length * (8 * hidden + 2 * intermediate + 2 * heads * length)


def _config_int(config, name: str, default: int) -> int:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def resolve_tasks(checkpoint, requested: str) -> list[str]:
    """``glue`` means every task the checkpoint has a head for; otherwise a comma list.

    Names are matched as the task registry matches them ("SST-2" is sst2). An
    empty list and a task named twice are refused: the first would average
    nothing, the second evaluate (and count) a task twice.
    """
    from umtam.tasks import normalise_task_name

    available = list(checkpoint.tasks)
    if requested.strip() == "glue":
        return available
    given = [name.strip() for name in requested.split(",") if name.strip()]
    if not given:
        raise ConfigError(f"--task {requested!r} names no task",
                          hint=f"it has: {', '.join(available)}; use --task glue for all")
    by_key = {normalise_task_name(name): name for name in available}
    names, seen = [], {}
    for name in given:
        resolved = by_key.get(normalise_task_name(name), name)
        if resolved in seen:
            spellings = f" (as {seen[resolved]!r} and {name!r})" if seen[resolved] != name else ""
            raise ConfigError(f"--task {requested!r} names task {resolved} twice{spellings}",
                              hint="name each task once")
        seen[resolved] = name
        names.append(resolved)
    missing = [given_name for resolved, given_name in seen.items() if resolved not in available]
    if missing:
        raise ConfigError(
            f"{checkpoint.path} has no head for task(s) {', '.join(missing)}",
            hint=f"it has: {', '.join(available)}; use --task glue for all",
        )
    return names


def checkpoint_source(checkpoint):
    """The checkpoint as the model source of its own config.json and tokenizer files."""
    from umtam.models import ModelSource

    return ModelSource(str(checkpoint.path), str(checkpoint.path), "checkpoint")


def build_task_model(checkpoint, task: str, tensors: dict):
    """The encoder plus ``task``'s head, as a transformers sequence-classification model."""
    from umtam import models
    from umtam.families import family_of
    from umtam.heads import split_head_key

    record = checkpoint.tasks[task]
    regression = record.is_regression
    source = checkpoint_source(checkpoint)
    config = models.load_config(source)
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
    model = models.classifier_from_config(config, source)
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

    Before any data is read: the tasks, config.json (and --max-length against
    the positions it gives) and every head's size against its task's labels.
    """
    from umtam import batching, data, models
    from umtam.config import build_config
    from umtam.config.evaluate import EvalSettings
    from umtam.families import family_of
    from umtam.heads import check_head_labels
    from umtam.safetensors_io import tensor_shapes

    options = build_config(EvalSettings, settings, source="eval options")
    requested, holdout_fraction = options.task, options.holdout_fraction
    tasks = resolve_tasks(checkpoint, requested)
    source = checkpoint_source(checkpoint)
    config = models.load_config(source)
    max_length = models.fit_max_length(options.max_length, config, source)
    check_head_labels(checkpoint, tensor_shapes(checkpoint.model_file))
    tokenizer = models.load_tokenizer(source, family_of(config))
    tensors = checkpoint.load_tensors()
    results: dict[str, Any] = {}
    for task in tasks:
        task_data = data.load_task(task, data_dir=options.data_dir, max_eval_samples=options.max_eval_samples,
                                   seed=options.seed, need_train=False, holdout_fraction=holdout_fraction)
        model = build_task_model(checkpoint, task, tensors)
        chosen = {"holdout": task_data.holdout} if holdout_fraction else task_data.eval
        splits = {
            split: evaluate_model(model, batching.encode(examples, tokenizer, max_length), task,
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
