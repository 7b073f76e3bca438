"""Encoder classifiers: BERT (and MiniLM, a BERT), RoBERTa, DistilBERT, with sequence-classification heads.

Parameter names as transformers' ``*ForSequenceClassification`` has them:
BERT and RoBERTa ``<base>.encoder.layer.<i>.attention.self.query.weight`` ...,
DistilBERT ``distilbert.transformer.layer.<i>.attention.q_lin.weight`` .... The
head is ``classifier.*``; DistilBERT's also has ``pre_classifier.*``, a freshly
initialised dense layer of its own per task.
"""

from __future__ import annotations

from umtam.families import FAMILIES, ModelFamily

_BERT_MODULES = (
    ("pooler", (("pooler",),)),
    ("query", (("attention", "self", "query"),)),
    ("key", (("attention", "self", "key"),)),
    ("value", (("attention", "self", "value"),)),
    # the attention output must be tested before the feed-forward "output.dense"
    ("attention_output", (("attention", "output", "dense"),)),
    ("ffn_in", (("intermediate", "dense"),)),
    ("ffn_out", (("output", "dense"),)),
)
_DISTILBERT_MODULES = (
    ("query", (("attention", "q_lin"),)),
    ("key", (("attention", "k_lin"),)),
    ("value", (("attention", "v_lin"),)),
    ("attention_output", (("attention", "out_lin"),)),
    ("ffn_in", (("ffn", "lin1"),)),
    ("ffn_out", (("ffn", "lin2"),)),
)

for _family in (
    ModelFamily("bert", ("bert",), ("classifier.",), _BERT_MODULES, aliases=("MiniLM",),
                summary="BERT and BERT-shaped encoders (all-MiniLM-L6-v2 is one)"),
    ModelFamily("roberta", ("roberta", "xlm-roberta", "camembert"), ("classifier.",), _BERT_MODULES,
                summary="RoBERTa and XLM-RoBERTa (classifier.dense + classifier.out_proj head)"),
    ModelFamily("distilbert", ("distilbert",), ("pre_classifier.", "classifier."), _DISTILBERT_MODULES,
                summary="DistilBERT (pre_classifier + classifier head)"),
):
    FAMILIES.register(_family)
