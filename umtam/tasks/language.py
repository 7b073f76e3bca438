"""The language tasks: causal language modelling on plain text, and instruction tuning on conversations.

``lm`` reads documents (umtam.lm_data: .txt, .jsonl with ``text``, parquet, or
a hub dataset id when online) and trains next-token prediction on packed
blocks; ``sft`` reads conversations (``messages`` or ``prompt``/``response``),
renders them with the model's chat template and trains on the response tokens
only. Both score token-weighted loss and perplexity. ``choice`` is ``sft`` on
rows that also list the answers to choose from (label words, for GLUE cast as
instructions: tools/glue_as_choices.py), scored by choice accuracy.
"""

from __future__ import annotations

from umtam.tasks import TASKS, LanguageTask

for _task in (
    LanguageTask("lm", "causal language modelling on text (--data): packed blocks, every token a target"),
    LanguageTask("sft", "instruction tuning on conversations (--data .jsonl): loss on the responses only"),
    LanguageTask("choice", "multiple-choice instruction tuning (--data .jsonl with choices): sft's loss, "
                           "scored by the share of rows whose right answer is the likeliest choice",
                 metrics=("choice_accuracy",), higher_is_better=True),
):
    TASKS.register(_task)
