"""The language tasks: causal language modelling on plain text, and instruction tuning on conversations.

``lm`` reads documents (umtam.lm_data: .txt, .jsonl with ``text``, parquet, or
a hub dataset id when online) and trains next-token prediction on packed
blocks; ``sft`` reads conversations (``messages`` or ``prompt``/``response``),
renders them with the model's chat template and trains on the response tokens
only. Both score token-weighted loss and perplexity.
"""

from __future__ import annotations

from umtam.tasks import TASKS, LanguageTask

for _task in (
    LanguageTask("lm", "causal language modelling on text (--data): packed blocks, every token a target"),
    LanguageTask("sft", "instruction tuning on conversations (--data .jsonl): loss on the responses only"),
):
    TASKS.register(_task)
