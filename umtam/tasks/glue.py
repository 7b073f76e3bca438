"""The nine GLUE tasks (https://gluebenchmark.com), as the benchmark defines them.

Label names follow the Hugging Face ``nyu-mll/glue`` dataset's label ids; the
TSV layouts are the canonical GLUE files'; metrics as the leaderboard scores
them (MRPC and QQP: F1 and accuracy; STS-B: Pearson and Spearman; CoLA:
Matthews correlation; the rest accuracy; MNLI on matched and mismatched dev).
"""

from __future__ import annotations

from umtam.tasks import TASKS, TaskSpec, TsvLayout

_VALIDATION = ("validation",)
_NLI_2WAY = ("entailment", "not_entailment")
_PAIR = ("sentence1", "sentence2")

for _spec in (
    TaskSpec("cola", ("sentence",), ("unacceptable", "acceptable"), False, _VALIDATION, "CoLA",
             # source, label, original_label, sentence
             TsvLayout((3,), 1, headerless_width=4), ("matthews_correlation",)),
    TaskSpec("sst2", ("sentence",), ("negative", "positive"), False, _VALIDATION, "SST-2",
             TsvLayout(("sentence",), "label"), ("accuracy",)),
    TaskSpec("mrpc", _PAIR, ("not_equivalent", "equivalent"), False, _VALIDATION, "MRPC",
             TsvLayout(("#1 String", "#2 String"), "Quality"), ("f1", "accuracy")),
    TaskSpec("stsb", _PAIR, (), True, _VALIDATION, "STS-B",
             TsvLayout(_PAIR, "score"), ("pearson", "spearmanr")),
    TaskSpec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), False, _VALIDATION, "QQP",
             TsvLayout(("question1", "question2"), "is_duplicate"), ("f1", "accuracy")),
    TaskSpec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), False,
             ("validation_matched", "validation_mismatched"), "MNLI",
             TsvLayout(_PAIR, "gold_label", ("dev_matched.tsv", "dev_mismatched.tsv")), ("accuracy",)),
    TaskSpec("qnli", ("question", "sentence"), _NLI_2WAY, False, _VALIDATION, "QNLI",
             TsvLayout(("question", "sentence"), "label"), ("accuracy",)),
    TaskSpec("rte", _PAIR, _NLI_2WAY, False, _VALIDATION, "RTE", TsvLayout(_PAIR, "label"), ("accuracy",)),
    TaskSpec("wnli", _PAIR, ("not_entailment", "entailment"), False, _VALIDATION, "WNLI",
             TsvLayout(_PAIR, "label"), ("accuracy",)),
):
    TASKS.register(_spec)
