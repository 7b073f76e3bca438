"""Shared fixtures: a tiny BERT with a word-level vocabulary and a tiny GLUE directory.

Everything is built in code, so the core suite needs no network and no files
from outside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite's files are far below the digest cache's size floor; tests that use the cache point it elsewhere
os.environ["UMTAM_CACHE_DIR"] = "off"

SHARED = Path(os.environ.get("UMTAM_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (deselected by default)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~3 s on 2 cores; runs only with --slow")


def pytest_collection_modifyitems(config, items):
    """Without --slow, deselect (not skip) the slow tests, so the summary counts them as deselected."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]
        config.hook.pytest_deselected(items=slow)


def build_tiny_model_dir(directory: Path) -> Path:
    """Save a 2-layer BERT (a few thousand parameters) and its tokenizer to ``directory``."""
    import torch
    from transformers import BertConfig, BertModel

    from glue_fixtures import make_word_tokenizer

    tokenizer = make_word_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory) -> Path:
    from glue_fixtures import write_glue_dir

    return write_glue_dir(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="session")
def shared_glue_dir() -> Path:
    path = Path(os.environ.get("UMTAM_DATA_DIR", SHARED / "data" / "glue"))
    if not (path / "MRPC" / "dev.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {path}")
    return path


@pytest.fixture(scope="session")
def shared_model_dir() -> Path:
    path = Path(os.environ.get("UMTAM_MODEL_DIR", SHARED / "models" / "all-MiniLM-L6-v2"))
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"real MiniLM model not found at {path}")
    return path
