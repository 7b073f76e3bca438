"""Tokenized features and deterministic batches for training and evaluation.

Batch order is a pure function of (n, batch_size, seed, epoch): a resumed run
recomputes any epoch's order and skips the batches it has already seen.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterator, Sequence

import torch

from umtam.errors import ConfigError
from umtam.tasks import Example

_ENCODE_CHUNK = 1000  # examples per tokenizer call: fast batched calls, bounded memory


def check_positive(name: str, value: int | None) -> None:
    """ConfigError naming the option unless ``value`` is None or a positive int."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def encode(examples: Sequence[Example], tokenizer, max_length: int) -> list[dict]:
    """Tokenize examples (truncated to ``max_length``, unpadded) into feature dicts with labels."""
    check_positive("max_length", max_length)
    features: list[dict] = []
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = examples[start:start + _ENCODE_CHUNK]
        texts_a = [ex.text_a for ex in chunk]
        if any(ex.text_b is not None for ex in chunk):
            texts_b = [ex.text_b or "" for ex in chunk]
            encoded = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length)
        else:
            encoded = tokenizer(texts_a, truncation=True, max_length=max_length)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        for i, ex in enumerate(chunk):
            feature = {key: list(encoded[key][i]) for key in keys}
            feature.setdefault("attention_mask", [1] * len(feature["input_ids"]))
            feature["labels"] = ex.label
            features.append(feature)
    return features


def collate(features: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence; labels long (classes) or float (regression)."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_token_id is None:
        raise ConfigError("the tokenizer has no padding token (pad_token_id is None)",
                          hint="use a model whose tokenizer defines a pad token")
    width = max(len(feature["input_ids"]) for feature in features)
    batch = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in features[0]:
            pad = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([f[key] + [pad] * (width - len(f[key])) for f in features],
                                      dtype=torch.long)
    if "labels" in features[0]:
        labels = [feature["labels"] for feature in features]
        regression = any(isinstance(label, float) for label in labels)
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return batch


# Eval batches may take this share of the memory available when evaluation starts: the
# rest is for the model's weights, the tokenised data and whatever else runs on the machine.
EVAL_MEMORY_FRACTION = 0.25


def available_memory_bytes(device=None, meminfo: str = "/proc/meminfo") -> int | None:
    """Memory a new allocation can take now, or None where it is not known (nothing is capped then).

    On a CUDA device its free memory; otherwise MemAvailable of /proc/meminfo
    (Linux: free memory plus what the kernel can reclaim without swapping).
    """
    if device is not None and getattr(device, "type", None) == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def capped_batches(order: Sequence[int], lengths: Sequence[int], batch_size: int,
                   bytes_per_example: Callable[[int], int], budget: int | None) -> list[list[int]]:
    """``order`` cut into consecutive batches of at most ``batch_size`` whose activations fit ``budget``.

    ``order`` runs longest first, so a batch pads to its first example's length
    and ``bytes_per_example(length)`` times its size must stay within the
    budget; a batch holds at least one example whatever the budget. Without a
    budget every batch is ``batch_size`` long (the last one shorter).
    """
    check_positive("batch_size", batch_size)
    batches, start = [], 0
    while start < len(order):
        size = batch_size
        if budget is not None:
            size = max(1, min(batch_size, budget // max(1, bytes_per_example(lengths[order[start]]))))
        batches.append(list(order[start:start + size]))
        start += size
    return batches


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for one epoch, a stable hash of (seed, epoch).

    torch's CPU generator keeps only the low 32 bits of a seed, so packing
    seed and epoch side by side would drop the seed; a hash mixes both into
    those 32 bits and is the same on every platform and Python version.
    """
    digest = hashlib.blake2b(f"umtam-epoch/{seed}/{epoch}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def batch_order(n: int, batch_size: int, *, seed: int, epoch: int,
                shuffle: bool = True) -> list[list[int]]:
    """Example indices per batch; a pure function of its arguments, so resume can recompute it."""
    check_positive("batch_size", batch_size)
    if shuffle:
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def iter_batches(features: Sequence[dict], batch_size: int, *, pad_token_id: int, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True, start: int = 0) -> Iterator[dict]:
    """Collated batches of one epoch; ``start`` skips that many batches (resuming mid-epoch)."""
    for indices in batch_order(len(features), batch_size, seed=seed, epoch=epoch,
                               shuffle=shuffle)[start:]:
        yield collate([features[i] for i in indices], pad_token_id)
