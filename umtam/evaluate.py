"""Evaluate checkpoints: GLUE dev sets with the official metric per task, and language tasks by perplexity.

A trained or pruned classifier has one head; a merged one has one head per
task under ``heads/<task>/``. Either way each task is evaluated with a model
built from the shared encoder plus that task's own head. A language-task
checkpoint (``lm:<data>``, ``sft:<data>``) is the causal LM itself, with no
head: it is scored by token-weighted loss and perplexity on each task's
recorded validation text, or on the text ``data`` names. For merges, scores
are also reported normalised by each expert's own score (from the sidecar):
score / expert's where higher is better, expert's / score for perplexity, so
1.0 always means "as good as the expert".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from umtam.errors import CheckpointError, ConfigError, first_line
from umtam.progress import ProgressFn, no_progress
from umtam.weights import load_weights


def resolve_tasks(checkpoint, requested: str) -> list[str]:
    """``glue`` means every task the checkpoint has; otherwise a comma list of its task keys.

    Names are matched as the task registry matches them ("SST-2" is sst2); a
    language task's name ("lm") stands for every one of its keys ("lm:fineweb",
    ...). An empty list and a task named twice are refused: the first would
    average nothing, the second evaluate (and count) a task twice.
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
        expanded = _language_keys(available, name) or [by_key.get(normalise_task_name(name), name)]
        for resolved in expanded:
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


def _language_keys(available: list[str], name: str) -> list[str]:
    """The checkpoint's keys of language task ``name`` ("lm" -> ["lm:fineweb", ...]), else []."""
    from umtam.tasks import KEY_SEPARATOR, is_language_key

    return [key for key in available if is_language_key(key) and key.split(KEY_SEPARATOR)[0] == name.strip()]


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
    load_weights(model, state, f"{checkpoint.model_file} (task {task})")
    return model


def build_language_model(checkpoint, tensors: dict):
    """The causal LM a language-task checkpoint holds (its tied weights tied again on loading)."""
    from umtam import models

    source = checkpoint_source(checkpoint)
    model = models.model_from_config(models.load_config(source), source, "causal-lm")
    load_weights(model, tensors, str(checkpoint.model_file))
    return model


def evaluate_checkpoint(checkpoint, *, progress: ProgressFn = no_progress, weights: dict | None = None,
                        **settings: Any) -> dict[str, Any]:
    """{task: {"splits": {split: metrics}, "score": float, "normalized": float | None}}.

    ``settings`` are EvalSettings' (umtam.config.evaluate: task, data_dir, data,
    max_eval_samples, max_length, batch_size, seed, holdout_fraction), validated
    with their declared defaults and ranges. With ``holdout_fraction`` the fixed
    holdout slice of train is evaluated instead of dev (the slice ``umtam train
    --holdout-fraction`` kept unseen), so merge and prune settings can be chosen
    without looking at dev; the normalised score then compares with the expert's
    own holdout score (``normalized_score``).

    ``weights`` scores other tensors (the same names and shapes, tied aliases
    left out) on exactly the checkpoint's tasks, rows and tokenizer: the model it
    was fine-tuned from, say, to show what fine-tuning gained.

    Before any data is read: the tasks, config.json (and --max-length against
    the positions it gives) and every head's size against its task's labels.
    """
    from umtam import models
    from umtam.config import build_config
    from umtam.config.evaluate import EvalSettings
    from umtam.families import family_of
    from umtam.heads import check_head_labels
    from umtam.tasks import is_language_key

    options = build_config(EvalSettings, settings, source="eval options")
    tasks = resolve_tasks(checkpoint, options.task)
    language = [task for task in tasks if is_language_key(task)]
    if options.data is not None and (not language or len(language) != len(tasks)):
        raise ConfigError("--data is the text a language task is evaluated on",
                          hint="use it with --task lm or --task sft on a language-model checkpoint")
    source = checkpoint_source(checkpoint)
    config = models.load_config(source)
    max_length = models.fit_max_length(options.max_length, config, source)
    check_head_labels(checkpoint, checkpoint.tensor_shapes())
    tokenizer = models.load_tokenizer(source, family_of(config))
    tensors = checkpoint.load_tensors() if weights is None else weights
    setup = _Setup(options, tokenizer, max_length, tensors, progress)
    if language:
        return _evaluate_language(checkpoint, language, setup)
    return {task: _evaluate_classification(checkpoint, task, setup) for task in tasks}


@dataclass
class _Setup:
    options: Any  # EvalSettings
    tokenizer: Any
    max_length: int
    tensors: dict
    progress: ProgressFn


def _evaluate_classification(checkpoint, task: str, setup: _Setup) -> dict[str, Any]:
    from umtam import batching
    from umtam.objectives.classification import evaluate

    options = setup.options
    holdout_fraction = options.holdout_fraction
    chosen = scored_rows(task, data_dir=options.data_dir, max_eval_samples=options.max_eval_samples,
                         seed=options.seed, holdout_fraction=holdout_fraction)
    model = build_task_model(checkpoint, task, setup.tensors)
    splits = {
        split: evaluate(model, batching.encode(examples, setup.tokenizer, setup.max_length), task,
                        pad_token_id=setup.tokenizer.pad_token_id, batch_size=options.batch_size,
                        progress=setup.progress)
        for split, examples in chosen.items()
    }
    reference = "expert_holdout_metrics" if holdout_fraction else "expert_metrics"
    return _result(checkpoint, task, splits, checkpoint.tasks[task].as_json(), reference, no_skill_floor(task, chosen))


def scored_rows(task: str, *, data_dir=None, max_eval_samples: int | None = None, seed: int = 0,
                holdout_fraction: float = 0.0) -> dict[str, list]:
    """The labelled rows a GLUE task is scored on, by split: dev's, or the holdout slice of train."""
    from umtam import data

    task_data = data.load_task(task, data_dir=data_dir, max_eval_samples=max_eval_samples, seed=seed,
                               need_train=False, holdout_fraction=holdout_fraction)
    return {"holdout": task_data.holdout} if holdout_fraction else task_data.eval


def no_skill_floor(task: str, rows_by_split: dict[str, list]) -> float:
    """``no_skill_score`` of each split's labels, averaged over the splits as the task's score is."""
    return sum(no_skill_score(task, [e.label for e in rows]) for rows in rows_by_split.values()) / len(rows_by_split)


def no_skill_score(task: str, labels) -> float:
    """The better of chance and the majority-class baseline on these labels: what ignoring the input scores."""
    from umtam import metrics

    return max(metrics.chance_score(task, labels), metrics.majority_score(task, labels))


def _result(checkpoint, task: str, splits, record: dict[str, Any], reference: str | None,
            floor: float = 0.0) -> dict[str, Any]:
    """Scores, their task score and (None without a ``reference`` of the same rows) the normalised one."""
    try:
        normalized = None if reference is None else normalized_score(task, splits, record, reference, floor)
    except (ValueError, TypeError, KeyError) as exc:  # the expert's recorded metrics lack this task's metric
        raise CheckpointError(f"{checkpoint.path / 'umtam.json'}: tasks.{task}.{reference} gives no "
                              f"{task} score ({first_line(exc, 200)})") from exc
    return {"splits": splits, "score": task_score(task, splits), "normalized": normalized}


def _evaluate_language(checkpoint, tasks: list[str], setup: _Setup) -> dict[str, Any]:
    """Each language task on its recorded validation text, or the model once on ``data`` per task kind."""
    from umtam.data import split_holdout, subsample
    from umtam.objectives import language
    from umtam.tasks import task_spec

    options = setup.options
    model = build_language_model(checkpoint, setup.tensors)
    jobs: dict[str, tuple[list, dict[str, Any], str]] = {}  # key -> (features, record, split)
    for task in tasks:
        spec, record = task_spec(task), checkpoint.tasks[task].as_json()
        # the length the task was trained and validated at, unless --max-length says otherwise:
        # perplexity depends on the context a block gives, and the expert's normalises this one
        length = setup.max_length if options.max_length is not None else record.get("max_length", setup.max_length)
        featurize = language.featurizer(spec, setup.tokenizer, length)
        if options.data is not None:
            key = language.task_key(spec, options.data)
            if key not in jobs:
                jobs[key] = (featurize(language.read_items(spec, options.data)),
                             _record_on(checkpoint, spec, options.data), "data")
        elif options.holdout_fraction:
            check_holdout_fraction(task, record, options.holdout_fraction)
            items = split_holdout(language.read_items(spec, record["data_source"]), options.holdout_fraction)[1]
            jobs[task] = (featurize(items), record, "holdout")
        else:
            jobs[task] = (language.validation_features(spec, record, setup.tokenizer, length),
                          record, language.VALIDATION)
    results = {}
    for key, (features, record, split) in jobs.items():
        if not features:
            raise ConfigError(f"{key}: no text to evaluate on")
        same_rows = scores_the_experts_rows(len(features), record, options)
        features = subsample(features, options.max_eval_samples, options.seed)
        metrics = language.evaluate(model, features, key, pad_token_id=setup.tokenizer.pad_token_id,
                                    batch_size=options.batch_size, progress=setup.progress)
        reference = _reference(record, split, options.holdout_fraction) if same_rows else None
        floor = language.no_skill_score(features)  # choice accuracy's; perplexity has none
        results[key] = _result(checkpoint, key, {split: metrics}, record, reference, floor or 0.0)
    return results


def check_holdout_fraction(task: str, record: dict[str, Any], fraction: float) -> None:
    """Refuse a holdout slice other than the one the expert held out: it would hold rows it trained on."""
    trained = (record.get("eval_rows") or {}).get("holdout_fraction", fraction)  # unrecorded (older): as asked
    if trained != fraction:
        held = f"held out {trained:g} of its text" if trained else "held out none of its text"
        raise ConfigError(f"{task}: its expert {held}; --holdout-fraction {fraction:g} would score rows it trained on",
                          hint=f"give --holdout-fraction {trained:g}" if trained else "evaluate on its validation text")


def scores_the_experts_rows(count: int, record: dict[str, Any], options) -> bool:
    """Whether ``options`` pick, of ``count`` rows, those the expert's recorded scores are of (unrecorded: yes).

    A score normalised by the expert's on other rows (all 840 blocks against its 100) compares two samples.
    """
    from umtam.data import subsample

    rows = record.get("eval_rows")
    if rows is None:
        return True
    every = list(range(count))
    return (subsample(every, rows["max_eval_samples"], rows["seed"])
            == subsample(every, options.max_eval_samples, options.seed))


def _reference(record: dict[str, Any], split: str, holdout_fraction: float | None) -> str:
    """The recorded expert scores a split's score is normalised by."""
    if split != "holdout":
        return "expert_metrics"
    # an expert without --eval-data validated on its holdout slice: its validation scores are of these rows
    same_slice = record.get("eval_holdout_fraction") == holdout_fraction
    return "expert_metrics" if same_slice else "expert_holdout_metrics"


def _record_on(checkpoint, spec, data: str) -> dict[str, Any]:
    """The record of the checkpoint's task of ``spec``'s kind whose validation text is ``data``, else {}.

    Its expert's perplexity normalises the score only when it was measured on the same text.
    """
    from pathlib import Path

    target = str(Path(data).resolve()) if Path(data).exists() else data
    for key, record in checkpoint.tasks.items():
        fields = record.as_json()
        if key.split(":")[0] == spec.name and fields.get("eval_data") == target:
            return fields
    return {}


def task_score(task: str, splits: dict[str, dict[str, float]]) -> float:
    """A task's score: its metrics' mean (GLUE's rule; perplexity for a language task), averaged over splits."""
    from umtam import metrics

    values = [metrics.score(task, split_metrics) for split_metrics in splits.values()]
    return sum(values) / len(values)


# An expert less than this far above its no-skill floor normalises nothing: the ratio would divide by
# noise (a dev set of a few hundred rows moves a score by 2-3 points between seeds).
NORMALIZE_MARGIN = 0.10


def normalized_score(task: str, splits, record: dict[str, Any], reference: str = "expert_metrics",
                     floor: float = 0.0) -> float | None:
    """The score against the expert's own on the same task (1.0: as good, 0.0: no skill), when defined.

    Where higher is better (GLUE): (score - floor) / (expert's - floor), the
    share of the expert's gain over ``floor`` that is kept; ``floor`` is what a
    model ignoring its input scores on the evaluated rows (``no_skill_score``:
    chance or the majority class). None when the expert is within
    NORMALIZE_MARGIN of the floor: dividing by its own noise is how a plain
    score / expert's ratio blew up (a CoLA expert at MCC 0.06 turned a merge's
    -0.04 into -67%). Choice accuracy (``choice``) is normalised the same way,
    over the floor of its rows' answers. Where lower is better (a language
    task's perplexity): expert's / score, perplexity having no no-skill floor
    of its own.
    """
    from umtam.tasks import task_spec

    expert = record.get(reference)
    if not expert:
        return None
    if reference == "expert_holdout_metrics":
        expert = {"holdout": expert}
    expert_score, score = task_score(task, expert), task_score(task, splits)
    if task_spec(task).higher_is_better:
        gain = expert_score - floor
        return (score - floor) / gain if gain >= NORMALIZE_MARGIN else None
    return expert_score / score if score else None
