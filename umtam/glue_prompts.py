"""GLUE tasks cast as multiple-choice instructions (``--task choice`` rows): a prompt and label words.

A decoder LM learns a GLUE task as an instruction: the example's text in a
prompt that names the answers, and the label word as the response, which
``--task choice`` trains on (sft's loss) and scores by whether the right word
is the likeliest (umtam.lm_data.choice_features). One ``Prompt`` per task is
registered here; STS-B, a regression, has no label words and is not one.

    rows = choice_rows("sst2", examples)   # [{"prompt", "response", "choices"}, ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from umtam.registry import Registry
from umtam.tasks import normalise_task_name


@dataclass(frozen=True)
class Prompt:
    task: str  # the GLUE task (umtam.tasks)
    template: str  # str.format fields: a, b (the example's texts)
    words: tuple[str, ...]  # the answer for each label id, in the task's label order

    @property
    def name(self) -> str:
        return self.task


PROMPTS: Registry[Prompt] = Registry("GLUE prompt", normalise=normalise_task_name)
_YES_NO = "Answer yes or no."
for _prompt in (
    Prompt("sst2", "Is the sentiment of this movie review positive or negative? Answer positive or negative.\n\n"
                   "Review: {a}", ("negative", "positive")),
    Prompt("cola", f"Is this sentence grammatical English? {_YES_NO}\n\nSentence: {{a}}", ("no", "yes")),
    Prompt("mrpc", f"Do these two sentences say the same thing? {_YES_NO}\n\nSentence 1: {{a}}\nSentence 2: {{b}}",
           ("no", "yes")),
    Prompt("rte", f"Does the text imply the hypothesis? {_YES_NO}\n\nText: {{a}}\nHypothesis: {{b}}", ("yes", "no")),
    Prompt("qnli", f"Does the sentence answer the question? {_YES_NO}\n\nQuestion: {{a}}\nSentence: {{b}}",
           ("yes", "no")),
    Prompt("wnli", f"Does the first sentence imply the second? {_YES_NO}\n\nSentence 1: {{a}}\nSentence 2: {{b}}",
           ("no", "yes")),
):
    PROMPTS.register(_prompt)


def choice_rows(task: str, examples: Sequence) -> list[dict]:
    """``--task choice`` rows of labelled GLUE examples (umtam.tasks.Example)."""
    prompt = PROMPTS.get(task)
    return [{"prompt": prompt.template.format(a=example.text_a, b=example.text_b),
             "response": prompt.words[int(example.label)], "choices": list(prompt.words)} for example in examples]


def write_choice_files(task: str, out: Path, *, data_dir: str | Path | None = None,
                       max_train_rows: int | None = None, seed: int = 0) -> dict[str, Path]:
    """``out``/train.jsonl (train, or a seeded subset) and ``out``/validation.jsonl (dev) of a GLUE task.

    The folder is named for the task's data in a checkpoint (``choice:<folder name>``);
    it is written whole or not at all, replacing an earlier one (umtam.atomic.write_directory).
    """
    from umtam.atomic import write_jsonl_directory
    from umtam.data import load_task

    data = load_task(PROMPTS.get(task).task, data_dir=data_dir, max_train_samples=max_train_rows, seed=seed)
    (dev,) = data.eval.values()
    write_jsonl_directory(out, {"train.jsonl": choice_rows(task, data.train), "validation.jsonl": choice_rows(task, dev)},
                          what="choice data")
    return {"train": out / "train.jsonl", "validation": out / "validation.jsonl"}
