"""Classification and regression (GLUE): a sequence-classification head, scored by the task's metrics.

The model is transformers' ``*ForSequenceClassification`` for any family: an
encoder's ``classifier`` head, or a decoder backbone's ``score`` head (which
reads the last non-padding token, so the tokenizer's pad token id goes into
its config). Evaluation batches length-sorted examples under a memory cap
(``evaluate``).
"""

from __future__ import annotations

from typing import Any

from umtam.objectives import Prepared
from umtam.progress import ProgressFn, no_progress

ARCHITECTURE = "sequence-classification"


def build_model(source, spec, *, from_config: bool = False):
    """The classifier for ``spec``'s labels, pretrained or (``from_config``) initialised from the global RNG."""
    from umtam import models

    head = {"num_labels": spec.num_labels, "label_names": spec.label_names, "is_regression": spec.is_regression}
    if not from_config:
        return models.load_classifier(source, **head)
    config = models.load_config(source)
    config.num_labels = spec.num_labels
    if spec.is_regression:
        config.problem_type = "regression"
    return models.model_from_config(config, source, ARCHITECTURE)


def prepare(spec, config, tokenizer, max_length: int, progress: ProgressFn = no_progress) -> Prepared:
    """The GLUE task's train, dev and holdout examples, encoded (``config``: the TrainConfig's data fields)."""
    from umtam import batching, data
    from umtam.errors import UmtamError

    progress("status", f"loading {spec.name} data")
    task_data = data.load_task(
        spec.name, data_dir=config.data_dir, max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples, seed=config.seed, holdout_fraction=config.holdout_fraction,
    )
    if not task_data.train:
        raise UmtamError(f"task {spec.name}: the training split is empty ({task_data.source})")

    def encode(examples):
        return batching.encode(examples, tokenizer, max_length)

    return Prepared(spec.name, encode(task_data.train), {split: encode(rows) for split, rows in task_data.eval.items()},
                    task_data.source, encode(task_data.holdout) if task_data.holdout else [])


def collate(features, pad_token_id: int):
    from umtam import batching

    return batching.collate(features, pad_token_id)


def train_loss(forward, batch):
    """The head's own loss (cross-entropy, or mean squared error for regression)."""
    return forward(**batch).loss


def evaluate(model, features, task: str, *, pad_token_id: int, batch_size: int = 64,
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


def task_record(spec, metrics: dict[str, Any], holdout_metrics: dict[str, Any] | None, prepared: Prepared):
    return {"label_names": list(spec.label_names), "is_regression": spec.is_regression, "metrics": metrics,
            "holdout_metrics": holdout_metrics, "data_source": prepared.source, **prepared.record}
