"""Decoder language models: GPT-2, Llama (and SmolLM2, a Llama), Mistral, Qwen2.

Parameter names as transformers has them. Llama, Mistral and Qwen2 share
``model.layers.<i>.self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``
with ``model.embed_tokens``; GPT-2 has ``transformer.h.<i>.attn.c_attn`` (query,
key and value fused in one matrix), ``attn.c_proj``, ``mlp.c_fc`` and
``mlp.c_proj``, with ``transformer.wte`` and ``wpe`` embeddings.

With ``--task lm`` or ``sft`` the model is the causal LM itself: its
``lm_head`` is shared by every task like any other weight (tied to the token
embedding when the config says so, and then saved once). With a GLUE task the
same backbone gets transformers' ``*ForSequenceClassification`` head,
``score.*``, which is the task head here. None of these tokenizers needs a pad
token of its own: the end-of-sequence token pads, and padded positions are
masked out of attention and of the loss.
"""

from __future__ import annotations

from umtam.families import FAMILIES, ModelFamily

_LLAMA_MODULES = (
    ("query", (("self_attn", "q_proj"),)),
    ("key", (("self_attn", "k_proj"),)),
    ("value", (("self_attn", "v_proj"),)),
    ("attention_output", (("self_attn", "o_proj"),)),
    ("ffn_gate", (("mlp", "gate_proj"),)),
    ("ffn_in", (("mlp", "up_proj"),)),
    ("ffn_out", (("mlp", "down_proj"),)),
    ("lm_head", (("lm_head",),)),
)
_GPT2_MODULES = (
    ("qkv", (("attn", "c_attn"),)),
    ("attention_output", (("attn", "c_proj"),)),
    ("ffn_in", (("mlp", "c_fc"),)),
    ("ffn_out", (("mlp", "c_proj"),)),
    ("lm_head", (("lm_head",),)),
)

for _family in (
    ModelFamily("gpt2", ("gpt2",), ("score.",), _GPT2_MODULES, embedding_parts=("wte", "wpe"), pad_token="eos",
                layer_pattern=r"(?:^|\.)h\.(\d+)(?:\.|$)", decoder=True,
                summary="GPT-2 (fused c_attn; learned position embeddings)"),
    ModelFamily("llama", ("llama",), ("score.",), _LLAMA_MODULES, embedding_parts=("embed_tokens",),
                pad_token="eos", decoder=True, aliases=("SmolLM2",),
                summary="Llama and Llama-shaped models (SmolLM2 is one)"),
    ModelFamily("mistral", ("mistral",), ("score.",), _LLAMA_MODULES, embedding_parts=("embed_tokens",),
                pad_token="eos", decoder=True, summary="Mistral"),
    ModelFamily("qwen2", ("qwen2",), ("score.",), _LLAMA_MODULES, embedding_parts=("embed_tokens",),
                pad_token="eos", decoder=True, summary="Qwen2 (biases on q, k and v)"),
):
    FAMILIES.register(_family)
