"""Causal language modelling (``lm``, ``sft``): the causal LM itself, scored by loss and perplexity.

The model is transformers' ``*ForCausalLM``: pretrained, or built from
config.json alone for a run from scratch. Its data is text the user names
(``--data``; umtam.lm_data reads and tokenizes it); validation is
``--eval-data``, or else the ``--holdout-fraction`` slice of ``--data``'s
documents (conversations for ``sft``), the same fixed slice on every run.

Loss and perplexity are token-weighted, the standard definition: the summed
negative log-likelihood of every predicted token (every position whose label
is not -100, each predicted from the tokens before it) divided by their number,
and perplexity = exp(that mean). A batch's own mean (what ``model(...).loss``
returns) would weight short batches like long ones; summing per batch and
dividing once does not.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from umtam.errors import ConfigError, DataError
from umtam.lm_data import IGNORE_INDEX
from umtam.objectives import Prepared
from umtam.progress import ProgressFn, no_progress

ARCHITECTURE = "causal-lm"
VALIDATION = "validation"


def build_model(source, spec, *, from_config: bool = False):
    """The causal LM, pretrained or (``from_config``) initialised from the global RNG."""
    from umtam import models

    if not from_config:
        return models.load_causal_lm(source)
    return models.model_from_config(models.load_config(source), source, ARCHITECTURE)


def prepare(spec, config, tokenizer, max_length: int, progress: ProgressFn = no_progress) -> Prepared:
    """Train, validation and holdout features of ``config.data`` (and ``config.eval_data``), tokenized."""
    from umtam.data import split_holdout, subsample
    from umtam.lm_data import data_name

    if config.data is None:
        raise ConfigError(f"--task {spec.name} needs --data: the text to train on",
                          hint="a .txt, .jsonl or parquet file, a directory of them, or a hub dataset id")
    if config.eval_data is None and not config.holdout_fraction:
        raise ConfigError(f"--task {spec.name} needs validation text",
                          hint="give --eval-data FILE, or --holdout-fraction F to hold out part of --data")
    progress("status", f"reading {config.data}")
    items = read_items(spec, config.data)
    if config.eval_data is not None:
        train_items, held = split_holdout(items, config.holdout_fraction)
        validation = read_items(spec, config.eval_data)
    else:
        (train_items, validation), held = split_holdout(items, config.holdout_fraction), []
    if not train_items or not validation:
        raise DataError(f"{config.data}: {len(items)} text(s) cannot be split into training and validation "
                        f"text with --holdout-fraction {config.holdout_fraction}",
                        hint="give --eval-data, or more text")
    progress("status", f"tokenizing {len(train_items)} training and {len(validation)} validation text(s)")
    features = featurizer(spec, tokenizer, max_length)
    # max_length: the block (lm) or conversation (sft) length of the recorded validation, which eval repeats
    # eval_rows: which rows the recorded scores are of, so that eval normalises only on the same rows
    # and never calls rows the expert trained on a holdout
    record = {"data_name": data_name(config.data), "eval_data": _location(config.eval_data),
              "eval_holdout_fraction": None if config.eval_data is not None else config.holdout_fraction,
              "max_length": max_length,
              "eval_rows": {"max_eval_samples": config.max_eval_samples, "seed": config.seed,
                            "holdout_fraction": config.holdout_fraction}}
    return Prepared(
        task_key=task_key(spec, config.data),
        train=subsample(features(train_items), config.max_train_samples, config.seed),
        eval={VALIDATION: subsample(features(validation), config.max_eval_samples, config.seed)},
        source=_location(config.data),
        holdout=subsample(features(held), config.max_eval_samples, config.seed) if held else [],
        record=record,
    )


def task_key(spec, data: str) -> str:
    from umtam.lm_data import data_name
    from umtam.tasks import language_task_key

    return language_task_key(spec.name, data_name(data))


def read_items(spec, data: str) -> list:
    """Documents (``lm``), conversations (``sft``) or conversations with choices (``choice``) of a --data."""
    from umtam.lm_data import read_choice_items, read_conversations, read_documents

    return {"sft": read_conversations, "choice": read_choice_items}.get(spec.name, read_documents)(data)


def featurizer(spec, tokenizer, max_length: int):
    """texts -> features: packed blocks (``lm``), templated conversations with response labels (``sft``),
    and those with every choice rendered beside them (``choice``)."""
    from umtam.lm_data import choice_features, lm_features, sft_features

    features = {"sft": sft_features, "choice": choice_features}.get(spec.name, lm_features)
    return lambda items: features(items, tokenizer, max_length) if items else []


def validation_features(spec, record, tokenizer, max_length: int) -> list[dict]:
    """The validation text a task record names, tokenized: its --eval-data, or its --data's holdout slice."""
    from umtam.data import split_holdout

    fields = record.as_json() if hasattr(record, "as_json") else dict(record)
    if fields.get("eval_data"):
        items = read_items(spec, fields["eval_data"])
    elif fields.get("eval_holdout_fraction") and fields.get("data_source"):
        items = split_holdout(read_items(spec, fields["data_source"]), fields["eval_holdout_fraction"])[1]
    else:
        raise ConfigError(f"the checkpoint does not record validation text for {spec.name}",
                          hint=f"give it: umtam eval CKPT --task {spec.name} --data FILE")
    return featurizer(spec, tokenizer, max_length)(items)


def _location(data: str | None) -> str | None:
    """A local path made absolute (so a later eval finds it from anywhere); a hub id as it is."""
    from pathlib import Path

    if data is None:
        return None
    return str(Path(data).resolve()) if Path(data).exists() else data


def collate(features: Sequence[dict], pad_token_id: int) -> dict[str, Any]:
    return collate_tokens(features, pad_token_id)


def train_loss(forward, batch: dict[str, Any]):
    """The batch's mean next-token loss over its labelled tokens: transformers' causal-LM loss.

    Where targets sit at no more than half of the positions (``sft`` and
    ``choice`` label the responses only), the model projects onto its
    vocabulary only the positions some row has a target at
    (``logits_to_keep``), not every prompt token: the head and its float32
    loss are a large part of a small decoder's step with a 50k-word
    vocabulary (SmolLM2-135M's shape, 8 rows of 160 tokens: 0.77x the step
    time, bench/kept_logits.py). ``lm`` blocks are labelled throughout and take
    the model's own loss, as before.
    """
    import torch

    targets = next_token_targets(batch["labels"])
    positions = sparse_positions(targets, getattr(forward, "module", forward))
    if positions is None:
        return forward(**batch).loss
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = forward(**inputs, logits_to_keep=positions).logits.float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, positions].reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def next_token_targets(labels):
    """``labels`` shifted one to the left: position t's target is token t + 1's label (-100 past the end)."""
    import torch

    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)


def sparse_positions(targets, model):
    """The positions some row has a target at, where they are at most half of the batch's positions and
    ``model`` can keep logits at given positions; None otherwise (compute every position's logits)."""
    import inspect

    labelled = (targets != IGNORE_INDEX).any(dim=0)
    count = int(labelled.sum())
    if count == 0 or 2 * count > targets.shape[1]:
        return None
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    return labelled.nonzero().squeeze(1)


def evaluate(model, features: Sequence[dict], task: str, *, pad_token_id: int, batch_size: int = 8,
             progress: ProgressFn = no_progress) -> dict[str, float]:
    """Loss and perplexity of the labelled tokens; with choices (``choice``), choice accuracy too.

    The right answer is one of the choices, so one pass over every choice gives
    both: its loss is the right choice's, not scored a second time.
    """
    if not (features and "choices" in features[0]):
        return evaluate_lm(model, features, pad_token_id=pad_token_id, batch_size=batch_size, progress=progress,
                           what=f"eval {task}")
    scored = _choice_losses(model, features, pad_token_id, batch_size, progress, f"eval {task}")
    right = [losses[feature["answer"]] for losses, feature in zip(scored, features)]
    metrics = _loss_metrics(sum(loss for loss, _ in right), sum(count for _, count in right))
    return {**metrics, "choice_accuracy": _accuracy(scored, features)}


def no_skill_score(features: Sequence[dict]) -> float | None:
    """What answering without reading scores on choice features (the better of chance and the most
    frequent answer's share); None for text with no choices, where perplexity has no such floor."""
    from collections import Counter

    if not features or "choices" not in features[0]:
        return None
    chance = sum(1 / len(feature["choices"]) for feature in features) / len(features)
    majority = Counter(feature["answer"] for feature in features).most_common(1)[0][1] / len(features)
    return max(chance, majority)


def task_record(spec, metrics: dict[str, Any], holdout_metrics: dict[str, Any] | None, prepared: Prepared):
    return {"label_names": [], "is_regression": False, "metrics": metrics, "holdout_metrics": holdout_metrics,
            "data_source": prepared.source, **prepared.record}


def collate_tokens(features: Sequence[dict], pad_token_id: int) -> dict[str, Any]:
    """Right-pad input_ids (with ``pad_token_id``), attention_mask (0) and labels (-100, never a target)."""
    import torch

    if not features:
        raise ValueError("collate_tokens needs at least one feature")
    width = max(len(feature["input_ids"]) for feature in features)
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features], dtype=torch.long)
            for key, pad in pads.items()}


# float32 logits one scoring forward may hold (512 MiB). A batch of 64 blocks of 256 tokens over GPT-2's
# 50,257 words is 3.3 GB of logits, and the loss holds two more of that: rows are scored in slices under
# this budget instead, which sums the same per-token losses.
LOGIT_BUDGET = 1 << 27


def evaluate_lm(model, features: Sequence[dict], *, pad_token_id: int, batch_size: int = 8,
                progress: ProgressFn = no_progress, what: str = "eval lm") -> dict[str, float]:
    """{"loss", "perplexity", "tokens"} of ``model`` on ``features`` (which carry their labels)."""
    total, count = 0.0, 0
    for _chunk, losses, counts in _scored_batches(model, features, pad_token_id, batch_size, progress, what):
        total, count = total + float(losses.sum()), count + int(counts.sum())
    return _loss_metrics(total, count)


def _loss_metrics(total: float, count: int) -> dict[str, float]:
    if count == 0:
        raise ValueError("no predicted token to score (every label is -100)")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def choice_accuracy(model, features: Sequence[dict], *, pad_token_id: int, batch_size: int = 8,
                    progress: ProgressFn = no_progress, what: str = "choose") -> float:
    """The share of features whose right choice has the highest likelihood (the least summed loss over
    its labelled tokens: the whole answer's probability, lm-evaluation-harness's ``acc``).

    Every choice of ``batch_size`` features is scored in one batch; ties go to the first choice.
    """
    return _accuracy(_choice_losses(model, features, pad_token_id, batch_size, progress, what), features)


def _choice_losses(model, features, pad_token_id: int, batch_size: int, progress, what) -> list[list[tuple]]:
    """Per feature, per choice: (summed loss over its labelled tokens, their number)."""
    candidates = [dict(choice, owner=index) for index, feature in enumerate(features) for choice in feature["choices"]]
    scored: list[list[tuple]] = [[] for _ in features]
    width = max(len(feature["choices"]) for feature in features)
    for chunk, losses, counts in _scored_batches(model, candidates, pad_token_id, batch_size * width, progress, what):
        for candidate, loss, count in zip(chunk, losses.tolist(), counts.tolist()):
            scored[candidate["owner"]].append((loss, count))
    return scored


def _accuracy(scored: list[list[tuple]], features: Sequence[dict]) -> float:
    """The share of features whose least-loss choice (the first on a tie) is the answer."""
    picks = [min(range(len(choices)), key=lambda number: choices[number][0]) for choices in scored]
    return sum(pick == feature["answer"] for pick, feature in zip(picks, features)) / len(features)


def _scored_batches(model, features: Sequence[dict], pad_token_id: int, batch_size: int, progress, what: str):
    """(features, per-row summed loss, per-row labelled-token count) for each batch, in eval mode.

    Rows go through the model in slices under LOGIT_BUDGET, so the batch size
    bounds the work per progress step and not the logits held.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    progress("start", {"total": len(features), "what": what})
    try:
        for start in range(0, len(features), batch_size):
            chunk = features[start:start + batch_size]
            with torch.inference_mode():  # not held across the yield: the caller's code runs in its own mode
                batch = {key: value.to(device) for key, value in collate_tokens(chunk, pad_token_id).items()}
                rows = max(1, LOGIT_BUDGET // (batch["input_ids"].shape[1] * model.config.vocab_size))
                sliced = [_row_token_losses(model, {key: value[first:first + rows] for key, value in batch.items()})
                          for first in range(0, len(chunk), rows)]
                losses, counts = torch.cat([s[0] for s in sliced]), torch.cat([s[1] for s in sliced])
            yield chunk, losses, counts
            progress("advance", len(chunk))
    finally:
        model.train(was_training)
    progress("end", {"what": what})


def _row_token_losses(model, batch: dict[str, Any]):
    """Per row: the summed next-token negative log-likelihood (float64) of its labelled tokens, and their number."""
    import torch

    # shift the targets, not the logits: a slice of the logits would be a copy of all of them
    targets = next_token_targets(batch.pop("labels"))
    positions = sparse_positions(targets, model)  # a choice's answer: a few positions of a long prompt
    if positions is None:
        logits = model(**batch).logits.float()
    else:
        logits, targets = model(**batch, logits_to_keep=positions).logits.float(), targets[:, positions]
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none")
    scored = targets != IGNORE_INDEX
    return losses.view(targets.shape).double().sum(dim=1), scored.sum(dim=1)
