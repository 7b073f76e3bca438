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


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                        bos_token_id=1, eos_token_id=1, pad_token_id=1))


def response_only_batch(seed: int = 5):
    """Four prompts of uneven length, each with a 2-token answer labelled at its end (choice and sft rows)."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for length in (20, 13, 25, 16):
        ids = torch.randint(2, 30, (length,), generator=generator).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * length,
                         "labels": [IGNORE_INDEX] * (length - 2) + ids[-2:]})
    return features


def kept_positions(model):
    """Record the logits_to_keep each forward of ``model`` is given."""
    import functools

    seen = []
    forward = model.forward

    @functools.wraps(forward)  # the signature stays the model's
    def spy(*args, **kwargs):
        seen.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)
    model.forward = spy
    return seen


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_a_response_only_batch_projects_only_its_labelled_positions_with_the_models_own_loss(build):
    from umtam.objectives.language import train_loss

    batch = collate_tokens(response_only_batch(), pad_token_id=1)
    reference_model, model = build().train(), build().train()
    torch.manual_seed(7)  # the same dropout masks on both: the trunk is the same, only the head differs
    expected = reference_model(**batch).loss  # transformers' causal-LM loss over every position's logits
    expected.backward()
    seen = kept_positions(model)
    torch.manual_seed(7)
    got = train_loss(model, dict(batch))
    got.backward()
    # the answers' targets sit at positions 17-18, 10-11, 22-23 and 13-14 of 25: 8 positions, not 25
    assert seen[0].tolist() == [10, 11, 13, 14, 17, 18, 22, 23]
    assert abs(float(got.detach()) - float(expected.detach())) < 1e-6
    for (name, mine), theirs in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=1e-5), name


def test_packed_text_and_models_without_kept_logits_take_every_positions_logits():
    from umtam.objectives.language import next_token_targets, sparse_positions, train_loss

    model, reference_model = tiny_gpt2().train(), tiny_gpt2().train()
    blocks = collate_tokens([{"input_ids": list(range(2, 12)), "attention_mask": [1] * 10,
                              "labels": list(range(2, 12))}] * 2, pad_token_id=1)
    seen = kept_positions(model)
    torch.manual_seed(7)
    got = float(train_loss(model, dict(blocks)).detach())
    torch.manual_seed(7)
    assert got == float(reference_model(**blocks).loss.detach())
    assert seen == [None]  # every position labelled: the model's own loss

    class NoKeep(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, labels=None):
            raise AssertionError("not called")
    sparse = next_token_targets(collate_tokens(response_only_batch(), pad_token_id=1)["labels"])
    assert sparse_positions(sparse, NoKeep()) is None and sparse_positions(sparse, model) is not None


def test_choice_scoring_with_kept_logits_equals_the_slow_reference():
    model = tiny_llama().eval()
    features = response_only_batch()
    expected_loss, expected_count = one_token_at_a_time(model, features)
    seen = kept_positions(model)
    got = evaluate_lm(model, features, pad_token_id=1, batch_size=4)
    assert got["tokens"] == expected_count == 8 and abs(got["loss"] - expected_loss) < 1e-5
    assert seen[0] is not None and len(seen[0]) == 8
