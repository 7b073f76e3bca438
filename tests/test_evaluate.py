"""Classification evaluation's length-sorted batches against a slow reference: one example at a time, no padding."""

from __future__ import annotations

import pytest
import torch

from umtam import batching, data, metrics
from umtam.objectives.classification import evaluate as evaluate_model


def one_at_a_time(model, features, task):
    """The obviously-correct path: every example alone, so nothing is padded or regrouped."""
    predictions = []
    with torch.inference_mode():
        for feature in features:
            batch = batching.collate([feature], pad_token_id=0)
            batch.pop("labels")
            logits = model.eval()(**batch).logits.float()
            predictions.append(logits.squeeze(-1).item() if logits.shape[-1] == 1 else logits.argmax(-1).item())
    return metrics.compute_metrics(task, predictions, [f["labels"] for f in features]), predictions


@pytest.mark.parametrize("task, num_labels", [("mrpc", 2), ("stsb", 1)])
def test_sorted_batches_score_what_single_examples_score(task, num_labels, tiny_model_dir, glue_dir):
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=num_labels)
    # Redraw the weights large enough that the model's outputs depend on the input. At the saved
    # init (std 0.02) the regression outputs spread by only 8e-6 across examples, so the float
    # rounding by which a padded batch differs from a single example (1e-9 here; its size moved
    # between transformers versions, with the attention kernel) shifted Pearson by 2e-5. Spread
    # out to 0.3, the same rounding moves the metrics by well under 1e-6.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
    examples = data.load_task(task, data_dir=glue_dir).train
    # the fixture's sentences are all about as long: cut them to many lengths, so batches really pad
    features = [{key: value[:4 + (7 * i) % 12] if isinstance(value, list) else value for key, value in f.items()}
                for i, f in enumerate(batching.encode(examples, tokenizer, max_length=32))]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) > 3 and lengths != sorted(lengths, reverse=True)  # sorting really regroups
    expected, predictions = one_at_a_time(model, features, task)
    got = evaluate_model(model, features, task, pad_token_id=tokenizer.pad_token_id, batch_size=5)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == pytest.approx(expected[name], abs=1e-6)
    if num_labels == 1:  # regression: the scores are spread out, so a reordering bug would show
        assert len(set(round(p, 6) for p in predictions)) > 3 and max(predictions) - min(predictions) > 0.1
