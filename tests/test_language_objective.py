"""The causal-LM objective: padding never counts, and the loss is token-weighted, against a slow reference."""

from __future__ import annotations

import math

import pytest
import torch

from umtam.lm_data import IGNORE_INDEX
from umtam.objectives.language import collate_tokens, evaluate_lm


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=1)).eval()


def one_token_at_a_time(model, features):
    """The obviously-correct path: every sequence alone, every target's log-probability summed by hand."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for feature in features:
            ids = torch.tensor([feature["input_ids"]])
            log_probs = model(input_ids=ids).logits.float().log_softmax(-1)[0]
            for position in range(1, len(feature["input_ids"])):
                target = feature["labels"][position]
                if target != IGNORE_INDEX:
                    total -= float(log_probs[position - 1, target])
                    count += 1
    return total / count, count


def test_collate_pads_inputs_masks_and_labels_apart():
    batch = collate_tokens([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
                            {"input_ids": [8], "attention_mask": [1], "labels": [IGNORE_INDEX]}], pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]


@pytest.mark.parametrize("logit_budget", [1 << 27, 1])  # one forward per batch; one per row
def test_loss_is_token_weighted_and_equals_the_slow_reference(logit_budget, monkeypatch):
    monkeypatch.setattr("umtam.objectives.language.LOGIT_BUDGET", logit_budget)
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(3)
    features = []
    for length in (9, 3, 14, 6, 11):  # uneven lengths: batches pad, and batch means would weight them wrongly
        ids = torch.randint(2, 30, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 2 + ids[2:] if length > 6 else list(ids)  # some prompts not scored
        features.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    expected_loss, expected_count = one_token_at_a_time(model, features)
    got = evaluate_lm(model, features, pad_token_id=1, batch_size=2)
    assert got["tokens"] == expected_count == 7 + 2 + 12 + 5 + 9  # each predicts from position 1 on
    assert abs(got["loss"] - expected_loss) < 1e-5
    assert math.isclose(got["perplexity"], math.exp(got["loss"]))
