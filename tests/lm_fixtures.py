"""A tiny word-level tokenizer with an end-of-sequence token and a chat template, and tiny decoders, built in code."""

from __future__ import annotations

from pathlib import Path

WORDS = ["the", "cat", "dog", "sees", "likes", "a", "bird", ".", "hello", "how", "are", "you", "fine", "thanks",
         "what", "is", "two", "plus", "four", "?"]
SPECIAL = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
# A template in the shape of ChatML: each turn opens with its role token and closes with <|end|>.
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")


def make_lm_tokenizer(*, pad: bool = True, chat: bool = True):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                        pad_token="<pad>" if pad else None,
                                        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_text_corpus(root: Path) -> Path:
    """train.txt, validation.jsonl and a parquet file of tiny documents under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("the cat sees a bird . the dog likes the cat .\n" * 20)
    lines = ['{"text": "the bird sees the dog ."}', "", '{"text": "a cat likes a dog ."}']
    (root / "validation.jsonl").write_text("\n".join(lines) + "\n")
    return root


def decoder_config(family: str, *, tie: bool = True, vocab: int | None = None, kv_heads: int = 1):
    """A tiny config of ``family`` (gpt2, llama, mistral, qwen2) for the fixture tokenizer's vocabulary."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    vocab = vocab or len(SPECIAL) + len(WORDS)
    ids = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": tie}
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=64, **ids)
    common = {"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": kv_heads, "max_position_embeddings": 64, **ids}
    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**common)


def write_tiny_decoder(root: Path, family: str = "llama", *, tie: bool = True, dtype=None, seed: int = 0,
                       pad: bool = False, chat: bool = True, kv_heads: int = 1) -> Path:
    """A randomly initialised tiny causal LM of ``family`` with the fixture tokenizer, saved as transformers does."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(decoder_config(family, tie=tie, kv_heads=kv_heads))
    if dtype is not None:
        model = model.to(dtype)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    make_lm_tokenizer(pad=pad, chat=chat).save_pretrained(root)
    return root
