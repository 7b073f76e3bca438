"""Model families (umtam.families) and head keys (umtam.heads): what each architecture's names mean."""

from __future__ import annotations

import pytest

from umtam.families import FAMILIES, ModelFamily, family_for_type, family_of, generic_family
from umtam.heads import encoder_tensors, head_key, head_tensors, is_head_key, split_head_key


def test_head_keys_round_trip():
    key = head_key("mrpc", "classifier.weight")
    assert key == "heads/mrpc/classifier.weight"
    assert split_head_key(key) == ("mrpc", "classifier.weight")
    assert split_head_key("bert.pooler.dense.weight") is None
    assert split_head_key("heads/mrpc") is None  # a task with no key is not a head key


@pytest.mark.parametrize("model_type, family", [("bert", "bert"), ("roberta", "roberta"),
                                                ("xlm-roberta", "roberta"), ("distilbert", "distilbert"),
                                                ("electra", "generic"), (None, "generic")])
def test_the_config_model_type_picks_the_family(model_type, family):
    assert family_for_type(model_type).name == family
    assert family_of({"model_type": model_type}).name == family


def test_each_family_knows_its_heads():
    bert, distilbert = FAMILIES.get("bert"), FAMILIES.get("distilbert")
    assert bert.is_head_key("classifier.weight") and not bert.is_head_key("bert.pooler.dense.weight")
    # DistilBERT's pre_classifier is initialised per task: a head, never merged or fingerprinted
    assert distilbert.is_head_key("pre_classifier.weight") and not bert.is_head_key("pre_classifier.weight")
    generic = generic_family()
    assert all(generic.is_head_key(key) for key in ("classifier.bias", "score.weight", "pre_classifier.bias"))
    assert is_head_key("heads/sst2/classifier.weight") and is_head_key("classifier.bias")
    state = {"bert.encoder.layer.0.attention.self.query.weight": 1, "classifier.weight": 2,
             "heads/rte/classifier.bias": 3}
    assert encoder_tensors(state, bert) == {"bert.encoder.layer.0.attention.self.query.weight": 1}
    assert head_tensors(state, bert) == {"classifier.weight": 2, "heads/rte/classifier.bias": 3}


@pytest.mark.parametrize("name, family, kind", [
    ("bert.embeddings.word_embeddings.weight", "bert", "embeddings"),
    ("bert.encoder.layer.3.attention.self.query.weight", "bert", "query"),
    ("bert.encoder.layer.3.attention.output.dense.weight", "bert", "attention_output"),
    ("bert.encoder.layer.3.output.dense.weight", "bert", "ffn_out"),
    ("bert.encoder.layer.3.intermediate.dense.weight", "bert", "ffn_in"),
    ("bert.pooler.dense.weight", "bert", "pooler"),
    ("roberta.encoder.layer.0.attention.self.value.weight", "roberta", "value"),
    ("distilbert.transformer.layer.1.attention.q_lin.weight", "distilbert", "query"),
    ("distilbert.transformer.layer.1.ffn.lin2.weight", "distilbert", "ffn_out"),
    ("distilbert.embeddings.position_embeddings.weight", "distilbert", "embeddings"),
    ("bert.encoder.layer.3.attention.self.monkey.weight", "bert", "other"),
])
def test_module_types_follow_the_family_names(name, family, kind):
    assert FAMILIES.get(family).module_type(name) == kind
    assert generic_family().module_type(name) == kind  # the union reads every registered family's names


def test_a_family_is_refused_twice_and_an_unknown_name_lists_the_choices():
    from umtam.errors import ConfigError

    with pytest.raises(ValueError, match="already registered"):
        FAMILIES.register(ModelFamily("bert", ("bert",), ("classifier.",), ()))
    with pytest.raises(ConfigError, match="choose one of bert, roberta, distilbert"):
        FAMILIES.get("gpt3")
