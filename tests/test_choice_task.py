"""--task choice: instruction rows with a closed set of answers, trained as sft, scored by choice accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from lm_fixtures import make_lm_tokenizer, write_tiny_decoder
from test_language_objective import one_token_at_a_time, tiny_gpt2
from umtam.errors import DataError
from umtam.lm_data import IGNORE_INDEX, choice_features, read_choice_items, sft_features
from umtam.objectives.language import choice_accuracy, no_skill_score


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_each_choice_is_rendered_in_the_answers_place_with_labels_on_it_alone(tmp_path):
    tokenizer = make_lm_tokenizer()
    path = write_rows(tmp_path / "pick.jsonl", [
        {"prompt": "what is two plus two ?", "response": "four", "choices": ["two", "four"]}])
    (item,) = read_choice_items(path)
    assert item.choices == ("two", "four") and item.answer == 1
    (feature,) = choice_features([item], tokenizer, max_length=32)
    # the feature trains as sft on the right answer
    assert {k: feature[k] for k in ("input_ids", "attention_mask", "labels")} == sft_features(
        [item.messages], tokenizer, 32)[0]
    words = tokenizer.convert_ids_to_tokens
    assert [words([t])[0] for t in feature["choices"][0]["labels"] if t != IGNORE_INDEX] == ["two", "<|end|>"]
    assert feature["choices"][1] == {k: feature[k] for k in ("input_ids", "attention_mask", "labels")}
    assert feature["answer"] == 1


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hello", "response": "fine"}, "'choices' must list two or more"),
    ({"prompt": "hello", "response": "fine", "choices": ["fine"]}, "'choices' must list two or more"),
    ({"prompt": "hello", "response": "fine", "choices": ["fine", "fine"]}, "distinct"),
    ({"prompt": "hello", "response": "fine", "choices": ["fine", ""]}, "non-empty"),
    ({"prompt": "hello", "response": "fine", "choices": ["thanks", "you"]}, "'fine' is not one of its choices"),
])
def test_rows_whose_choices_cannot_be_scored_are_refused_naming_the_line(tmp_path, row, message):
    path = write_rows(tmp_path / "pick.jsonl", [{"prompt": "a", "response": "b", "choices": ["a", "b"]}, row])
    with pytest.raises(DataError, match=f"pick.jsonl:2: .*{message}"):
        read_choice_items(path)


def test_an_item_whose_longest_choice_does_not_fit_is_refused_not_cut():
    from umtam.lm_data import ChoiceItem

    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine"}]
    # rendered: <|user|> hello <|end|> <|assistant|> fine thanks <|end|> = 7 tokens with the longer choice
    item = ChoiceItem(messages, ("fine", "fine thanks"), 0)
    assert len(choice_features([item], make_lm_tokenizer(), max_length=7)) == 1
    with pytest.raises(DataError, match="item 1: 7 tokens with its longest choice, over --max-length 6"):
        choice_features([item], make_lm_tokenizer(), max_length=6)


def slow_choice_accuracy(model, features):
    """Each choice alone through the slow reference: the one with the least summed loss wins."""
    right = 0
    for feature in features:
        losses = []
        for choice in feature["choices"]:
            mean, count = one_token_at_a_time(model, [choice])
            losses.append(mean * count)
        right += min(range(len(losses)), key=losses.__getitem__) == feature["answer"]
    return right / len(features)


@pytest.mark.parametrize("logit_budget", [1 << 27, 1])
def test_choice_accuracy_equals_the_slow_reference(logit_budget, monkeypatch):
    monkeypatch.setattr("umtam.objectives.language.LOGIT_BUDGET", logit_budget)
    model = tiny_gpt2(seed=4)
    generator = torch.Generator().manual_seed(5)
    features = []
    for index in range(12):
        prompt = torch.randint(2, 30, (3 + index % 4,), generator=generator).tolist()
        choices = []
        for length in (1, 2, 1 + index % 3)[: 2 + index % 2]:  # two or three choices of uneven length
            answer = torch.randint(2, 30, (length,), generator=generator).tolist()
            choices.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + length),
                            "labels": [IGNORE_INDEX] * len(prompt) + answer})
        features.append({**choices[index % len(choices)], "choices": choices, "answer": index % len(choices)})
    expected = slow_choice_accuracy(model, features)
    assert 0 < expected < 1  # a random model picks some right and some wrong: the test can tell them apart
    assert choice_accuracy(model, features, pad_token_id=1, batch_size=5) == pytest.approx(expected)
    # eval's one pass over the choices gives the right answers' loss as scoring them alone does
    from umtam.objectives.language import evaluate, evaluate_lm

    metrics, alone = evaluate(model, features, "choice:x", pad_token_id=1, batch_size=5), evaluate_lm(
        model, features, pad_token_id=1, batch_size=5)
    assert metrics["tokens"] == alone["tokens"] and metrics["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert metrics["choice_accuracy"] == pytest.approx(expected)


def test_the_no_skill_floor_is_chance_or_the_most_frequent_answer():
    def feature(answer, choices=2):
        return {"choices": [{}] * choices, "answer": answer}

    assert no_skill_score([feature(0), feature(0), feature(1)]) == pytest.approx(2 / 3)  # majority
    # every answer once (majority 1/4); chance (1/4 + 1/4 + 1/4 + 1/2) / 4 = 0.3125
    assert no_skill_score([feature(0, 4), feature(2, 4), feature(3, 4), feature(1, 2)]) == pytest.approx(0.3125)
    assert no_skill_score([{"input_ids": [1], "labels": [1]}]) is None  # text: perplexity has no such floor


@pytest.mark.slow
def test_a_choice_run_learns_to_pick_and_eval_scores_it_against_its_floor(tmp_path):
    from cli_runner import run_cli
    from umtam.checkpoint import load_checkpoint
    from umtam.config.train import TrainConfig
    from umtam.train import train

    # two key-value heads: with one, this tiny model does not learn to copy the noun in 150 steps
    model = write_tiny_decoder(tmp_path / "llama", "llama", kv_heads=2)
    rows = [{"prompt": f"the {noun} sees a bird ?", "response": noun, "choices": ["cat", "dog"]}
            for noun in ("cat", "dog")] * 8
    data = write_rows(tmp_path / "pets" / "train.jsonl", rows)
    validation = write_rows(tmp_path / "pets" / "validation.jsonl", rows[:2])
    checkpoint = train(TrainConfig(task="choice", model=str(model), data=str(data), eval_data=str(validation),
                                   optimizer="adamw", max_steps=150, epochs=100, batch_size=4, max_length=32, lr=3e-3,
                                   output=str(tmp_path / "run")))
    (key, record), = checkpoint.sidecar.tasks.items()
    assert key == "choice:pets"
    # it reads the noun and repeats it; answering without reading scores 0.5 on these rows
    assert record.metrics["validation"]["choice_accuracy"] == 1.0
    code, out, stderr = run_cli("eval", str(tmp_path / "run"), "--task", "choice", "--json")
    assert code == 0, stderr
    result = json.loads(out)
    assert result["score_is"] == "choice_accuracy"
    (scored,) = result["tasks"].values()
    assert scored["score"] == 1.0 and scored["normalized"] is None  # an expert has no expert to compare with
    code, _, stderr = run_cli("prune", str(tmp_path / "run"), "--keep", "1.0", "-o", str(tmp_path / "all"), "--quiet")
    assert code == 0, stderr
    code, out, stderr = run_cli("eval", str(tmp_path / "all"), "--task", "choice", "--json")
    assert code == 0, stderr
    (kept,) = json.loads(out)["tasks"].values()
    assert kept["normalized"] == 1.0  # (1.0 - 0.5) / (the expert's 1.0 - 0.5), 0.5 the floor of these rows
    assert load_checkpoint(tmp_path / "all").tasks[key].expert_metrics["validation"]["choice_accuracy"] == 1.0


def test_perplexity_and_accuracy_are_not_averaged_together():
    from umtam_cli.cmd_eval import average_score

    assert average_score({"choice:a": {"score": 0.5}, "choice:b": {"score": 1.0}}) == 0.75
    assert average_score({"lm:a": {"score": 30.0}, "lm:b": {"score": 10.0}}) == 20.0
    assert average_score({"lm:a": {"score": 30.0}, "choice:b": {"score": 1.0}}) is None
    assert average_score({"sst2": {"score": 0.9}, "choice:b": {"score": 0.7}}) == pytest.approx(0.8)


def test_glue_examples_become_rows_whose_response_is_the_label_word():
    from umtam.glue_prompts import choice_rows
    from umtam.tasks import Example

    (row,) = choice_rows("RTE", [Example("It rained.", "The ground is wet.", 0)])  # 0: entailment
    assert row == {"prompt": "Does the text imply the hypothesis? Answer yes or no.\n\n"
                             "Text: It rained.\nHypothesis: The ground is wet.",
                   "response": "yes", "choices": ["yes", "no"]}
    assert [r["response"] for r in choice_rows("sst2", [Example("bad", None, 0), Example("good", None, 1)])] == [
        "negative", "positive"]


def test_the_choice_files_hold_train_and_dev_and_read_back_as_items(tmp_path, glue_dir):
    from umtam.data import load_task
    from umtam.glue_prompts import write_choice_files

    paths = write_choice_files("mrpc", tmp_path / "mrpc", data_dir=glue_dir)
    task = load_task("mrpc", data_dir=glue_dir)
    train, dev = read_choice_items(paths["train"]), read_choice_items(paths["validation"])
    assert [item.answer for item in train] == [int(e.label) for e in task.train]
    assert [item.answer for item in dev] == [int(e.label) for e in task.eval["validation"]]
    assert task.train[0].text_a in train[0].messages[0]["content"]
    assert not [p for p in tmp_path.rglob(".*")]  # nothing staged is left behind, in or beside the folder
