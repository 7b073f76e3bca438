"""Text for causal LM training: documents read from every format, packed with eos; SFT labels on responses only."""

from __future__ import annotations

import json

import pytest

from lm_fixtures import make_lm_tokenizer, write_text_corpus
from umtam.errors import ConfigError, DataError
from umtam.lm_data import (IGNORE_INDEX, lm_features, pack_documents, read_conversations, read_documents,
                           sft_features)


def test_documents_are_joined_with_eos_and_cut_into_whole_blocks():
    assert pack_documents([[1, 2, 3], [4, 5]], block=3, eos_id=0) == [[1, 2, 3], [0, 4, 5]]  # the last 0 dropped
    assert pack_documents([[1, 2], [3]], block=4, eos_id=0) == [[1, 2, 0, 3]]  # exactly one block, the eos dropped
    assert pack_documents([[1]], block=8, eos_id=0) == [[1, 0]]  # shorter than a block: kept whole


def test_every_format_is_read_and_empty_documents_are_skipped(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = write_text_corpus(tmp_path / "corpus")
    assert read_documents(corpus / "validation.jsonl") == ["the bird sees the dog .", "a cat likes a dog ."]
    assert len(read_documents(corpus / "train.txt")) == 1
    pq.write_table(pa.table({"text": ["a dog .", "  ", "the cat ."]}), corpus / "more.parquet")
    assert read_documents(corpus / "more.parquet") == ["a dog .", "the cat ."]
    # a directory: its files in name order
    assert len(read_documents(corpus)) == 2 + 1 + 2


@pytest.mark.parametrize("content, message", [
    ("", "no documents"),
    ('{"text": "a"}\n{"title": "b"}\n', "validation.jsonl:2: the row has no 'text' field"),
    ('{"text": 5}\n', "validation.jsonl:1: the row has a int as its 'text' field"),
    ("[1, 2]\n", "validation.jsonl:1: not a JSON object"),
    ("{bad\n", "validation.jsonl:1: not a JSON object"),
])
def test_bad_text_files_are_one_line_data_errors(tmp_path, content, message):
    path = tmp_path / "validation.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_documents(path)


def test_lm_features_are_blocks_whose_labels_are_their_tokens():
    tokenizer = make_lm_tokenizer()
    features = lm_features(["the cat", "a dog ."], tokenizer, block=3)
    eos = tokenizer.eos_token_id
    ids = tokenizer(["the cat", "a dog ."], add_special_tokens=False)["input_ids"]
    stream = ids[0] + [eos] + ids[1] + [eos]  # 7 tokens: two blocks of 3
    assert [f["input_ids"] for f in features] == [stream[:3], stream[3:6]]
    assert all(f["labels"] == f["input_ids"] and f["attention_mask"] == [1, 1, 1] for f in features)


def test_sft_labels_fall_on_the_assistant_turns_only(tmp_path):
    tokenizer = make_lm_tokenizer()
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": "hello", "response": "fine thanks"},
            {"messages": [{"role": "user", "content": "what is two plus two ?"},
                          {"role": "assistant", "content": "four"},
                          {"role": "user", "content": "how are you ?"},
                          {"role": "assistant", "content": "fine"}]}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    first, second = sft_features(read_conversations(path), tokenizer, max_length=64)
    words = tokenizer.convert_ids_to_tokens
    # rendered: <|user|> hello <|end|> <|assistant|> fine thanks <|end|>; the response and its end are targets
    assert words(first["input_ids"]) == ["<|user|>", "hello", "<|end|>", "<|assistant|>", "fine", "thanks", "<|end|>"]
    assert [words([t])[0] if t != IGNORE_INDEX else None for t in first["labels"]] == [
        None, None, None, None, "fine", "thanks", "<|end|>"]
    targets = [words([t])[0] for t in second["labels"] if t != IGNORE_INDEX]
    assert targets == ["four", "<|end|>", "fine", "<|end|>"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hello"}, "no 'response'"),
    ({"messages": [{"role": "user", "content": "hello"}]}, "no response"),
    ({"messages": [{"role": "user"}]}, "'messages' must be a list"),
])
def test_conversations_without_a_response_are_refused(tmp_path, row, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        read_conversations(path)


def test_sft_needs_a_chat_template_and_a_response_within_max_length():
    conversation = [[{"role": "user", "content": "what is two plus two ?"}, {"role": "assistant", "content": "four"}]]
    with pytest.raises(ConfigError, match="no chat template"):
        sft_features(conversation, make_lm_tokenizer(chat=False), max_length=64)
    with pytest.raises(DataError, match="no response token within --max-length 4"):
        sft_features(conversation, make_lm_tokenizer(), max_length=4)


def test_whole_documents_longer_than_the_models_maximum_are_packed_without_a_warning():
    import logging

    tokenizer = make_lm_tokenizer()
    tokenizer.model_max_length = 4
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = seen.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        features = lm_features(["the cat likes a dog . the bird sees the dog ."], tokenizer, block=3)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert len(features) == 4 and seen == []  # 12 tokens + eos, cut into blocks: nothing truncated


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_causal_lm_names_its_loss_and_it_is_next_token_cross_entropy(tmp_path, family):
    import torch

    from lm_fixtures import write_tiny_decoder
    from umtam.models import load_config, load_causal_lm, model_from_config, resolve_model

    source = resolve_model(str(write_tiny_decoder(tmp_path / family, family)))
    for model in (load_causal_lm(source), model_from_config(load_config(source), source, "causal-lm").eval()):
        # GPT2LMHeadModel's name matches no transformers loss: unnamed, it warns and falls back
        assert model.loss_type == "ForCausalLM"
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        logits = model(input_ids=ids).logits
        expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, expected)
