"""Tiny made-up GLUE directories and a word-level tokenizer that covers them.

Sentences use only GLUE_WORDS, so ``make_word_tokenizer()`` encodes every
fixture without [UNK]. Labels are learnable from cue words (sentiment words
for SST-2, "not"/"maybe"/"never" in the second sentence for the pair tasks,
articles for CoLA, the number of replaced words for STS-B), so a tiny model
can do better than chance.

    data_dir = write_glue_dir(tmp_path)                  # <tmp>/glue/MRPC/train.tsv ...
    parquet_dir = write_parquet_glue_dir(tmp_path, "rte")  # <tmp>/glue_hf_parquet/rte/...

The parquet copy holds exactly the examples of the TSV copy written with the
same arguments (as the real glue_hf_parquet mirrors glue/).
"""

from __future__ import annotations

import random
from pathlib import Path

_DETERMINERS = ["the", "a"]
_NOUNS = ["cat", "dog", "bird", "fish", "man", "woman", "child", "teacher"]
_VERBS = ["sees", "likes", "finds", "helps", "follows", "calls"]
_POSITIVE = ["good", "great", "nice"]
_NEGATIVE = ["bad", "awful", "poor"]
_FILLERS = ["and", "it", "is", "does", "today", "also"]
_CUES = ["not", "maybe", "never"]
GLUE_WORDS: list[str] = [*_DETERMINERS, *_NOUNS, *_VERBS, *_POSITIVE, *_NEGATIVE, *_FILLERS,
                         *_CUES, ".", "?"]

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # ids 0..3, BERT's names

# Per task: the canonical folder, the HF text columns and label names (as in umtam.data).
_TASKS = {
    "cola": ("CoLA", ("sentence",), ("unacceptable", "acceptable")),
    "sst2": ("SST-2", ("sentence",), ("negative", "positive")),
    "mrpc": ("MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "stsb": ("STS-B", ("sentence1", "sentence2"), ()),
    "qqp": ("QQP", ("question1", "question2"), ("not_duplicate", "duplicate")),
    "mnli": ("MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "qnli": ("QNLI", ("question", "sentence"), ("entailment", "not_entailment")),
    "rte": ("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": ("WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
}
_STRING_LABEL_TASKS = {"rte", "qnli", "mnli"}  # their TSVs spell labels out
_PAIR_CUE = {"not_equivalent": "not", "not_duplicate": "not", "not_entailment": "not",
             "neutral": "maybe", "contradiction": "never"}


def _clause(rng: random.Random) -> list[str]:
    return [rng.choice(_DETERMINERS), rng.choice(_NOUNS), rng.choice(_VERBS),
            rng.choice(_DETERMINERS), rng.choice(_NOUNS)]


def _example(task: str, label: int, rng: random.Random) -> tuple[str, str | None, int | float]:
    """One (text_a, text_b, HF label) whose label a cue in the text decides."""
    words = _clause(rng)
    if task == "cola":  # unacceptable: articles dropped and word order reversed
        text = words if label == 1 else [words[4], words[2], words[1]]
        return " ".join(text + ["."]), None, label
    if task == "sst2":
        mood = rng.choice(_POSITIVE if label == 1 else _NEGATIVE)
        # The real SST-2 sentences end in a stray space; keep it (both layouts hold it).
        return " ".join(words + ["and", "it", "is", mood, ". "]), None, label
    if task == "stsb":  # score falls by 1.25 per replaced word (exact in float32, like HF's column)
        other = list(words)
        for position in rng.sample([1, 2, 4], label):
            pool = _VERBS if position == 2 else _NOUNS
            other[position] = rng.choice([w for w in pool if w != words[position]])
        score = 5.0 - 1.25 * label
        return " ".join(words + ["."]), " ".join(other + ["."]), score
    end = "?" if task in ("qqp", "qnli") else "."
    label_name = _TASKS[task][2][label]
    second = _clause(rng) if label_name in ("not_equivalent", "not_duplicate") else list(words)
    if label_name in _PAIR_CUE:
        second.insert(2, _PAIR_CUE[label_name])
    return " ".join(words + [end]), " ".join(second + ["."]), label


def glue_examples(task: str, split: str, n: int, seed: int = 0) -> list[tuple]:
    """The fixture rows of one split: balanced labels, deterministic in (task, split, seed)."""
    rng = random.Random(f"{task}/{split}/{seed}")
    num_labels = 4 if task == "stsb" else len(_TASKS[task][2])  # stsb: 0..3 words replaced
    labels = [i % num_labels for i in range(n)]
    rng.shuffle(labels)
    return [_example(task, label, rng) for label in labels]


def _tsv_label(task: str, label: int | float) -> str:
    if task == "stsb":
        return f"{label:.3f}"
    return _TASKS[task][2][label] if task in _STRING_LABEL_TASKS else str(label)


# Canonical header and row layout per task (None: CoLA's files have no header).
_TSV_HEADERS = {
    "cola": None,
    "sst2": "sentence\tlabel",
    "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse"
            "\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "wnli": "index\tsentence1\tsentence2\tlabel",
}
_TSV_ROWS = {
    "cola": "gj04\t{tag}\t{star}\t{a}",
    "sst2": "{a}\t{tag}",
    "mrpc": "{tag}\t{id1}\t{id2}\t{a}\t{b}",
    "stsb": "{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{tag}",
    "qqp": "{i}\t{id1}\t{id2}\t{a}\t{b}\t{tag}",
    "mnli": "{i}\t{i}\t{i}n\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{tag}\t{tag}",
    "qnli": "{i}\t{a}\t{b}\t{tag}",
    "rte": "{i}\t{a}\t{b}\t{tag}",
    "wnli": "{i}\t{a}\t{b}\t{tag}",
}


def _tsv_lines(task: str, rows: list[tuple]) -> list[str]:
    """Header (if any) + rows in the canonical GLUE layout of ``task``."""
    lines = [_TSV_ROWS[task].format(i=i, a=a, b=b, tag=_tsv_label(task, label),
                                    star="" if label else "*", id1=1000 + i, id2=2000 + i)
             for i, (a, b, label) in enumerate(rows)]
    header = _TSV_HEADERS[task]
    return lines if header is None else [header, *lines]


def _eval_splits(task: str) -> dict[str, str]:
    """HF eval split name -> canonical TSV file name."""
    if task == "mnli":
        return {"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"}
    return {"validation": "dev.tsv"}


def write_glue_dir(root: Path, tasks=("mrpc", "sst2", "stsb", "rte", "cola"), n_train: int = 24,
                   n_dev: int = 12, seed: int = 0) -> Path:
    """Write ``<root>/glue/<TASK>/{train,dev}.tsv`` in the canonical layout; return ``<root>/glue``."""
    glue = Path(root) / "glue"
    for task in tasks:
        folder = glue / _TASKS[task][0]
        folder.mkdir(parents=True, exist_ok=True)
        files = {"train": "train.tsv", **_eval_splits(task)}
        for split, file_name in files.items():
            rows = glue_examples(task, split, n_train if split == "train" else n_dev, seed)
            # MRPC's real train/dev files start with a UTF-8 BOM; keep that quirk.
            encoding = "utf-8-sig" if task == "mrpc" else "utf-8"
            text = "\n".join(_tsv_lines(task, rows)) + "\n"
            (folder / file_name).write_text(text, encoding=encoding, newline="")
    return glue


def write_parquet_glue_dir(root: Path, task: str, n_train: int = 24, n_dev: int = 12,
                           seed: int = 0) -> Path:
    """Write ``<root>/glue_hf_parquet/<task>/<split>.parquet`` (HF columns); return the parent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_root = Path(root) / "glue_hf_parquet"
    folder = parquet_root / task
    folder.mkdir(parents=True, exist_ok=True)
    text_fields = _TASKS[task][1]
    for split in ("train", *_eval_splits(task)):
        rows = glue_examples(task, split, n_train if split == "train" else n_dev, seed)
        columns = {field: [row[k] for row in rows] for k, field in enumerate(text_fields)}
        label_type = pa.float32() if task == "stsb" else pa.int64()
        columns["label"] = pa.array([row[2] for row in rows], type=label_type)
        columns["idx"] = pa.array(range(len(rows)), type=pa.int32())
        pq.write_table(pa.table(columns), folder / f"{split}.parquet")
    return parquet_root


def make_word_tokenizer(words=GLUE_WORDS):
    """A BERT-like word-level fast tokenizer: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, then ``words``.

    Pairs encode as ``[CLS] a [SEP] b [SEP]`` with token_type_ids 0/1; text is
    lower-cased and split on whitespace and punctuation. Supports save_pretrained.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=128,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
