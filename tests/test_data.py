"""umtam.data: GLUE layouts, subsampling, errors, tokenization and batching."""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from glue_fixtures import (GLUE_WORDS, glue_examples, make_word_tokenizer, write_glue_dir,
                           write_parquet_glue_dir)
from umtam import batching
from umtam.batching import batch_order, collate, encode, iter_batches
from umtam.data import load_task, resolve_data_dirs
from umtam.tasks import Example, get_task, task_names
from umtam.errors import ConfigError, DataError

REAL_GLUE = Path(os.environ.get("UMTAM_DATA_DIR")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")


@pytest.fixture(autouse=True)
def _no_ambient_data(monkeypatch):
    # Tests pass data_dir explicitly; the user's environment must not leak in.
    monkeypatch.delenv("UMTAM_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def all_tasks_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    for task in task_names("classification"):
        write_parquet_glue_dir(root, task)
    return write_glue_dir(root, tasks=task_names("classification"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_word_tokenizer()


def _rewrite(path: Path, transform) -> None:
    """Edit a fixture file as text (keeping MRPC's BOM as bytes)."""
    path.write_bytes(transform(path.read_bytes().decode("utf-8")).encode("utf-8"))


# ---------------------------------------------------------------- task specs

def test_every_glue_task_has_a_spec():
    assert task_names("classification") == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
    assert get_task("stsb").num_labels == 1 and get_task("stsb").is_regression
    assert get_task("mnli").num_labels == 3
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("rte").label_names == ("entailment", "not_entailment")
    assert get_task("wnli").label_names == ("not_entailment", "entailment")


@pytest.mark.parametrize("typed, name", [("SST-2", "sst2"), ("STS-B", "stsb"), ("MRPC", "mrpc"),
                                         ("qqp", "qqp")])
def test_get_task_accepts_usual_spellings(typed, name):
    assert get_task(typed).name == name


def test_unknown_task_lists_choices_and_suggests():
    with pytest.raises(ConfigError) as caught:
        get_task("mrcp")
    assert "'mrcp'" in caught.value.message and "cola, sst2" in caught.value.message
    assert caught.value.message.endswith("(did you mean 'mrpc'?)")
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("task", task_names("classification"))
def test_tsv_layout_parses_every_task(all_tasks_dir, task):
    loaded = load_task(task, data_dir=all_tasks_dir, allow_hub=False)
    spec = get_task(task)
    assert loaded.source == f"tsv:{all_tasks_dir / spec.glue_dir}"
    expected_train = [Example(a, b, label) for a, b, label in glue_examples(task, "train", 24)]
    assert loaded.train == expected_train
    assert set(loaded.eval) == set(spec.eval_splits)
    for split, examples in loaded.eval.items():
        assert examples == [Example(*row) for row in glue_examples(task, split, 12)]


@pytest.mark.parametrize("task", task_names("classification"))
def test_parquet_layout_matches_tsv_layout(all_tasks_dir, task):
    from_tsv = load_task(task, data_dir=all_tasks_dir, allow_hub=False)
    from_parquet = load_task(task, data_dir=all_tasks_dir.parent / "glue_hf_parquet", allow_hub=False)
    assert from_parquet.source.startswith("parquet:")
    assert (from_parquet.train, from_parquet.eval) == (from_tsv.train, from_tsv.eval)


def test_cola_has_no_header_so_first_line_is_data(all_tasks_dir):
    first_line = (all_tasks_dir / "CoLA" / "train.tsv").read_text().splitlines()[0]
    source, label, _, sentence = first_line.split("\t")
    first = load_task("cola", data_dir=all_tasks_dir, allow_hub=False).train[0]
    assert (first.text_a, first.text_b, first.label) == (sentence, None, int(label))


def test_mrpc_bom_does_not_hide_the_quality_column(all_tasks_dir):
    assert (all_tasks_dir / "MRPC" / "dev.tsv").read_bytes().startswith(b"\xef\xbb\xbfQuality")
    labels = [ex.label for ex in load_task("mrpc", data_dir=all_tasks_dir, allow_hub=False).eval["validation"]]
    assert sorted(set(labels)) == [0, 1]


def test_rte_string_labels_map_to_hf_ids(all_tasks_dir):
    lines = (all_tasks_dir / "RTE" / "train.tsv").read_text().splitlines()[1:]
    names = [line.split("\t")[-1] for line in lines]
    loaded = load_task("rte", data_dir=all_tasks_dir, allow_hub=False)
    # HF order: entailment = 0, not_entailment = 1.
    assert [ex.label for ex in loaded.train] == [0 if n == "entailment" else 1 for n in names]
    assert "not_entailment" in names


def test_stsb_scores_are_floats(all_tasks_dir):
    loaded = load_task("stsb", data_dir=all_tasks_dir, allow_hub=False)
    assert all(isinstance(ex.label, float) for ex in loaded.train)
    assert {ex.label for ex in loaded.train} == {5.0, 3.75, 2.5, 1.25}


def test_layout_is_detected_per_task(tmp_path):
    glue = write_glue_dir(tmp_path, tasks=("mrpc",))
    shutil.move(write_parquet_glue_dir(tmp_path, "rte") / "rte", glue / "rte")
    assert load_task("mrpc", data_dir=glue, allow_hub=False).source.startswith("tsv:")
    assert load_task("rte", data_dir=glue, allow_hub=False).source == f"parquet:{glue / 'rte'}"


def test_need_train_false_reads_only_eval_splits(tmp_path):
    glue = write_glue_dir(tmp_path, tasks=("qnli",))
    (glue / "QNLI" / "train.tsv").unlink()  # as staged: QNLI has dev and test only
    loaded = load_task("qnli", data_dir=glue, allow_hub=False, need_train=False)
    assert loaded.train == [] and len(loaded.eval["validation"]) == 12
    with pytest.raises(DataError, match="split train"):
        load_task("qnli", data_dir=glue, allow_hub=False)


# ---------------------------------------------------------------- subsampling

def test_subsampling_is_seeded_reproducible_and_keeps_order(all_tasks_dir):
    full = load_task("sst2", data_dir=all_tasks_dir, allow_hub=False)

    def subset(seed):
        return load_task("sst2", data_dir=all_tasks_dir, allow_hub=False, seed=seed,
                         max_train_samples=10, max_eval_samples=5)

    first, again, other = subset(3), subset(3), subset(4)
    assert len(first.train) == 10 and len(first.eval["validation"]) == 5
    assert first.train == again.train and first.eval == again.eval
    assert first.train != other.train
    positions = [full.train.index(ex) for ex in first.train]
    assert positions == sorted(positions)  # file order kept
    # A limit above the size keeps everything.
    assert load_task("sst2", data_dir=all_tasks_dir, allow_hub=False,
                     max_train_samples=1000).train == full.train


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_nonpositive_sample_limits_are_config_errors(all_tasks_dir, bad):
    with pytest.raises(ConfigError, match="max_train_samples"):
        load_task("sst2", data_dir=all_tasks_dir, allow_hub=False, max_train_samples=bad)


# ---------------------------------------------------------------- data directories

def test_explicit_data_dir_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_task("mrpc", data_dir=missing, allow_hub=False)


def test_env_data_dir_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("UMTAM_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="UMTAM_DATA_DIR .*gone"):
        resolve_data_dirs()


def test_explicit_dir_wins_over_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UMTAM_DATA_DIR", str(tmp_path / "gone"))
    assert resolve_data_dirs(tmp_path) == [tmp_path]


def test_default_dir_is_shared_beside_the_working_directory(tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data" / "glue"
    shared.mkdir(parents=True)
    (tmp_path / "main").mkdir()
    monkeypatch.chdir(tmp_path / "main")
    assert resolve_data_dirs()[0].resolve() == shared.resolve()


def test_missing_task_names_every_place_tried(tmp_path):
    glue = write_glue_dir(tmp_path, tasks=("sst2",))
    with pytest.raises(DataError) as caught:
        load_task("qqp", data_dir=glue)
    message = caught.value.message
    assert message.startswith("no GLUE data for task 'qqp': tried ")
    assert f"{glue / 'QQP'} (missing)" in message and f"{glue / 'qqp'} (missing)" in message
    assert "offline" in message  # HF_DATASETS_OFFLINE=1 short-circuits the hub
    assert "UMTAM_DATA_DIR" in caught.value.hint and "\n" not in str(caught.value)


def test_hub_failure_is_converted(tmp_path, monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue'\nsecond line")

    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError) as caught:
        load_task("wnli", data_dir=tmp_path)
    assert "hub nyu-mll/glue (offline: ConnectionError: Couldn't reach 'nyu-mll/glue')" in caught.value.message
    assert "\n" not in str(caught.value)


def test_hub_fallback_reads_hf_columns(tmp_path, monkeypatch):
    rows = glue_examples("wnli", "validation", 4)
    split = types.SimpleNamespace(to_dict=lambda: {"sentence1": [r[0] for r in rows],
                                                   "sentence2": [r[1] for r in rows],
                                                   "label": [r[2] for r in rows]})
    fake = types.SimpleNamespace(load_dataset=lambda name, task: {"validation": split})
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    loaded = load_task("wnli", data_dir=tmp_path, need_train=False)
    assert loaded.source == "hub:nyu-mll/glue"
    assert loaded.eval["validation"] == [Example(*row) for row in rows]


# ---------------------------------------------------------------- malformed files

@pytest.fixture
def small_dir(tmp_path) -> Path:
    write_parquet_glue_dir(tmp_path, "mrpc")
    return write_glue_dir(tmp_path, tasks=("mrpc", "stsb", "rte", "cola", "sst2"), n_train=4, n_dev=4)


def test_empty_file(small_dir):
    dev = small_dir / "MRPC" / "dev.tsv"
    dev.write_bytes(b"")
    with pytest.raises(DataError, match=f"{dev} is empty"):
        load_task("mrpc", data_dir=small_dir, allow_hub=False)


def test_header_without_rows(small_dir):
    dev = small_dir / "RTE" / "dev.tsv"
    _rewrite(dev, lambda text: text.splitlines()[0] + "\n")
    with pytest.raises(DataError, match=f"{dev} has a header but no data rows"):
        load_task("rte", data_dir=small_dir, allow_hub=False)


def test_wrong_column_count_names_file_and_line(small_dir):
    train = small_dir / "RTE" / "train.tsv"
    _rewrite(train, lambda text: text + "99\tonly two columns\n")
    with pytest.raises(DataError) as caught:
        load_task("rte", data_dir=small_dir, allow_hub=False)
    assert caught.value.message == f"{train}:6: expected 4 tab-separated columns, found 2"


def test_label_out_of_range_names_file_line_and_value(small_dir):
    dev = small_dir / "CoLA" / "dev.tsv"
    _rewrite(dev, lambda text: text.replace("gj04\t0\t*", "gj04\t2\t*", 1))
    with pytest.raises(DataError) as caught:
        load_task("cola", data_dir=small_dir, allow_hub=False)
    line = next(n for n, row in enumerate(dev.read_text().splitlines(), 1) if "\t2\t" in row)
    assert caught.value.message.startswith(f"{dev}:{line}: label '2' is not one of")
    assert "unacceptable, acceptable, 0, 1" in caught.value.message


def test_unknown_string_label(small_dir):
    train = small_dir / "RTE" / "train.tsv"
    _rewrite(train, lambda text: text.replace("\tentailment\n", "\tmaybe\n", 1))
    with pytest.raises(DataError, match=f"{train}:\\d+: label 'maybe'"):
        load_task("rte", data_dir=small_dir, allow_hub=False)


def test_non_numeric_stsb_score(small_dir):
    train = small_dir / "STS-B" / "train.tsv"
    _rewrite(train, lambda text: text.replace("\t5.000\n", "\thigh\n", 1))
    with pytest.raises(DataError, match=f"{train}:\\d+: score 'high' is not a finite number"):
        load_task("stsb", data_dir=small_dir, allow_hub=False)


def test_missing_header_column(small_dir):
    dev = small_dir / "SST-2" / "dev.tsv"
    _rewrite(dev, lambda text: text.replace("sentence\tlabel", "text\tlabel", 1))
    with pytest.raises(DataError, match=f"{dev}: header has no column 'sentence'"):
        load_task("sst2", data_dir=small_dir, allow_hub=False)


def test_parquet_label_out_of_range(small_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = small_dir.parent / "glue_hf_parquet" / "mrpc" / "validation.parquet"
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[2] = 5
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array(labels, type=pa.int64())), path)
    with pytest.raises(DataError, match=f"{path}: row 2: label 5 is not one of"):
        load_task("mrpc", data_dir=small_dir.parent / "glue_hf_parquet", allow_hub=False)


# ---------------------------------------------------------------- tokenization and batches

def test_encode_single_and_pair(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    single = encode([Example("The cat sees a dog .", None, 1)], tokenizer, 32)[0]
    assert single["input_ids"] == [2, *ids(["the", "cat", "sees", "a", "dog", "."]), 3]
    assert single["attention_mask"] == [1] * 8 and single["labels"] == 1
    pair = encode([Example("a dog", "the cat", 0)], tokenizer, 32)[0]
    assert pair["input_ids"] == [2, *ids(["a", "dog"]), 3, *ids(["the", "cat"]), 3]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_encode_truncates_and_keeps_float_labels(tokenizer):
    features = encode([Example("the cat sees a dog today", "a bird also", 2.5)], tokenizer, 6)
    assert len(features[0]["input_ids"]) == 6 and features[0]["labels"] == 2.5


def test_fixture_words_cover_every_fixture_sentence(all_tasks_dir, tokenizer):
    assert tokenizer.unk_token_id == 1 and len(tokenizer) == 4 + len(GLUE_WORDS)
    for task in task_names("classification"):
        features = encode(load_task(task, data_dir=all_tasks_dir, allow_hub=False).train, tokenizer, 64)
        assert all(tokenizer.unk_token_id not in f["input_ids"] for f in features), task


def test_word_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("a dog", "the cat")["input_ids"] == tokenizer("a dog", "the cat")["input_ids"]
    assert reloaded.pad_token_id == 0


def test_collate_right_pads_with_the_pad_id():
    features = [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 0],
                 "labels": 1},
                {"input_ids": [2, 3], "attention_mask": [1, 1], "token_type_ids": [0, 1], "labels": 0}]
    batch = collate(features, pad_token_id=7)
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_collate_regression_labels_are_float():
    batch = collate([{"input_ids": [2], "attention_mask": [1], "labels": 2.5}], pad_token_id=0)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [2.5]
    assert "token_type_ids" not in batch


def test_collate_without_pad_token_is_a_config_error():
    with pytest.raises(ConfigError, match="pad"):
        collate([{"input_ids": [2], "attention_mask": [1], "labels": 0}], pad_token_id=None)


def test_batch_order_is_a_function_of_seed_and_epoch():
    first = batch_order(10, 4, seed=1, epoch=0)
    assert first == batch_order(10, 4, seed=1, epoch=0)
    assert first != batch_order(10, 4, seed=1, epoch=1)
    assert first != batch_order(10, 4, seed=2, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]  # last partial batch kept
    assert batch_order(5, 2, seed=1, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert batching.epoch_seed(1, 2) < 2**32  # torch's CPU generator ignores higher bits


def test_epoch_seeds_differ_across_seeds_and_epochs():
    seeds = {batching.epoch_seed(seed, epoch) for seed in range(20) for epoch in range(20)}
    assert len(seeds) == 400


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 50), batch_size=st.integers(1, 16), seed=st.integers(0, 2**31),
       epoch=st.integers(0, 100))
def test_batch_order_is_a_partition_of_all_indices(n, batch_size, seed, epoch):
    batches = batch_order(n, batch_size, seed=seed, epoch=epoch)
    assert sorted(i for batch in batches for i in batch) == list(range(n))
    assert all(len(batch) == batch_size for batch in batches[:-1])


def test_batch_size_must_be_positive():
    with pytest.raises(ConfigError, match="batch_size"):
        batch_order(4, 0, seed=0, epoch=0)


def test_iter_batches_follows_batch_order_and_resumes(tokenizer):
    examples = [Example(" ".join(["cat"] * (i + 1)), None, i % 2) for i in range(7)]
    features = encode(examples, tokenizer, 16)
    batches = list(iter_batches(features, 3, pad_token_id=0, seed=5, epoch=2, shuffle=True))
    order = batch_order(7, 3, seed=5, epoch=2)
    for indices, batch in zip(order, batches, strict=True):
        assert batch["labels"].tolist() == [i % 2 for i in indices]
        assert batch["input_ids"].shape[1] == max(i + 1 for i in indices) + 2  # + [CLS] [SEP]
    resumed = list(iter_batches(features, 3, pad_token_id=0, seed=5, epoch=2, shuffle=True, start=1))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, batches[1:], strict=True))


# ---------------------------------------------------------------- the real staged GLUE data

needs_real_glue = pytest.mark.skipif(not (REAL_GLUE / "MRPC" / "train.tsv").is_file(),
                                     reason=f"real GLUE data not found at {REAL_GLUE}")


@needs_real_glue
def test_real_mrpc_sizes_and_label_counts():
    mrpc = load_task("mrpc", data_dir=REAL_GLUE, allow_hub=False)
    assert len(mrpc.train) == 3668 and len(mrpc.eval["validation"]) == 408
    assert sum(ex.label for ex in mrpc.train) == 2474  # published: 2474 paraphrases / 1194 not


@needs_real_glue
@pytest.mark.parametrize("task", ["mrpc", "rte"])
def test_real_tsv_and_parquet_copies_agree(task):
    parquet_dir = REAL_GLUE.parent / "glue_hf_parquet"
    if not (parquet_dir / task / "validation.parquet").is_file():
        pytest.skip(f"no parquet copy at {parquet_dir}")
    tsv = load_task(task, data_dir=REAL_GLUE, allow_hub=False, need_train=False).eval["validation"]
    parquet = load_task(task, data_dir=parquet_dir, allow_hub=False, need_train=False).eval["validation"]
    assert [ex.label for ex in tsv] == [ex.label for ex in parquet]
    assert [" ".join(ex.text_a.split()) for ex in tsv] == [" ".join(ex.text_a.split()) for ex in parquet]


@needs_real_glue
def test_real_cola_dev_is_headerless():
    cola = load_task("cola", data_dir=REAL_GLUE, allow_hub=False, need_train=False)
    assert len(cola.eval["validation"]) == 1043


def test_holdout_is_fixed_disjoint_and_independent_of_the_run_seed(glue_dir):
    from umtam.data import load_task

    full = load_task("mrpc", data_dir=glue_dir, allow_hub=False)
    first = load_task("mrpc", data_dir=glue_dir, allow_hub=False, holdout_fraction=0.25, seed=1)
    second = load_task("mrpc", data_dir=glue_dir, allow_hub=False, holdout_fraction=0.25, seed=2)
    assert len(first.holdout) == 6 and len(first.train) == 18  # 24 rows, a quarter held out
    assert first.holdout == second.holdout
    assert {id(e) for e in first.holdout}.isdisjoint({id(e) for e in first.train})
    held = [e.text_a + str(e.text_b) for e in first.holdout]
    rest = [e.text_a + str(e.text_b) for e in first.train]
    assert sorted(held + rest) == sorted(e.text_a + str(e.text_b) for e in full.train)
