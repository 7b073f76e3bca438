"""Tiny checkpoints built in code, for prune and merge tests (nothing downloads).

A family is one tiny BERT base saved with save_pretrained (so that
base_model.load_base_encoder can rebuild and fingerprint it) plus "experts":
checkpoints written with write_checkpoint whose encoder is the base plus a
seeded perturbation, with their own head, statistics shaped like the ones
training records, config.json and a vocab file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from umtam.checkpoint import Checkpoint, write_checkpoint
from umtam.base_model import fingerprint
from umtam.heads import encoder_tensors, is_head_key

TINY_CONFIG = dict(
    vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=16, max_position_embeddings=32,
)
VOCAB = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]) + "\n"


def tiny_model(*, seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**TINY_CONFIG, num_labels=num_labels)).eval()


def save_tiny_base(directory: Path, *, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Save a tiny base model; return its sidecar base_model record and encoder tensors."""
    model = tiny_model(seed=seed)
    model.save_pretrained(directory)
    encoder = {k: v.detach().clone() for k, v in encoder_tensors(model.state_dict()).items()}
    record = {
        "reference": str(directory), "location": str(directory), "origin": "directory",
        "fingerprint": fingerprint(encoder), "init_seed": 0,
    }
    return record, encoder


def fake_stats(tensors: Mapping[str, torch.Tensor], *, seed: int, fisher: bool = False) -> dict[str, torch.Tensor]:
    """Row/column means of a random positive "G^2" per weight, as the training tracker records."""
    generator = torch.Generator().manual_seed(seed)
    stats = {}
    for name, tensor in tensors.items():
        squares = torch.rand(tensor.shape, generator=generator) * 1e-4 + 1e-6
        if tensor.dim() >= 2:
            as_matrix = squares.reshape(tensor.shape[0], -1)
            stats[f"exp_avg_sq_row/{name}"] = as_matrix.mean(dim=1)
            stats[f"exp_avg_sq_col/{name}"] = as_matrix.mean(dim=0)
        else:
            stats[f"exp_avg_sq/{name}"] = squares
        if fisher:
            stats[f"fisher/{name}"] = squares.clone()
    return stats


def make_expert(output: Path, *, base_record: dict, base_encoder: Mapping[str, torch.Tensor], task: str,
                seed: int, num_labels: int = 2, scale: float = 0.05, density: float = 0.6,
                with_stats: bool = True, with_fisher: bool = False) -> Checkpoint:
    """A "fine-tuned" checkpoint: base + a sparse seeded perturbation, its own head and stats."""
    generator = torch.Generator().manual_seed(seed)
    model = tiny_model(seed=seed, num_labels=num_labels)
    state = {}
    for name, tensor in model.state_dict().items():
        if is_head_key(name):
            state[name] = tensor.detach().clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator) * scale
        keep = torch.rand(tensor.shape, generator=generator) < density
        state[name] = base_encoder[name] + noise * keep
    sidecar = {
        "kind": "train",
        "tasks": {task: {"label_names": [f"l{i}" for i in range(num_labels)], "is_regression": False,
                         "metrics": {"accuracy": 0.5 + seed / 100}}},
        "base_model": dict(base_record),
        "optimizer": {"name": "umtam", "rank": 2},
    }
    return write_checkpoint(
        output,
        tensors=state,
        sidecar=sidecar,
        stats=fake_stats(state, seed=seed + 1000, fisher=with_fisher) if with_stats else None,
        extra_files={"config.json": model.config.to_json_string().encode(), "vocab.txt": VOCAB.encode()},
    )


@dataclass
class TinyFamily:
    root: Path
    base_dir: Path
    base_record: dict
    base_encoder: dict[str, torch.Tensor]
    experts: dict[str, Checkpoint] = field(default_factory=dict)

    def add_expert(self, task: str, *, seed: int, **kwargs) -> Checkpoint:
        checkpoint = make_expert(self.root / task, base_record=self.base_record,
                                 base_encoder=self.base_encoder, task=task, seed=seed, **kwargs)
        self.experts[task] = checkpoint
        return checkpoint


def build_family(root: Path, tasks: Mapping[str, int] = None, *, base_seed: int = 0) -> TinyFamily:
    """A base plus one expert per task (task -> number of labels)."""
    tasks = dict(tasks or {"mrpc": 2, "sst2": 2, "mnli": 3})
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / "base"
    record, encoder = save_tiny_base(base_dir, seed=base_seed)
    family = TinyFamily(root, base_dir, record, encoder)
    for index, (task, labels) in enumerate(tasks.items()):
        family.add_expert(task, seed=index + 1, num_labels=labels)
    return family
