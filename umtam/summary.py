"""What `umtam inspect` reports about a checkpoint, as plain data.

Shapes come from the safetensors headers, so a summary reads no tensor data
beyond what the hash check in load_checkpoint already streamed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def summarize(checkpoint) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint (the keys are documented in README)."""
    from umtam.checkpoint import HEADS_PREFIX
    from umtam.models import is_head_key

    sidecar = checkpoint.sidecar
    shapes = tensor_shapes(checkpoint.model_file)
    encoder = {k: s for k, s in shapes.items() if not k.startswith(HEADS_PREFIX) and not is_head_key(k)}
    return {
        "path": str(checkpoint.path),
        "kind": checkpoint.kind,
        "schema_version": sidecar["schema_version"],
        "tasks": {name: {"labels": record["label_names"], "is_regression": record.get("is_regression", False),
                         "metrics": record.get("metrics", {})}
                  for name, record in checkpoint.tasks.items()},
        "base_model": sidecar["base_model"],
        "parameters": {"total": sum(_numel(s) for s in shapes.values()),
                       "encoder": sum(_numel(s) for s in encoder.values()),
                       "tensors": len(shapes)},
        "stats": stats_summary(checkpoint),
        "optimizer": sidecar.get("optimizer"),
        "steps": sidecar.get("steps"),
        "seed": sidecar.get("seed"),
        "peak_rss_bytes": sidecar.get("peak_rss_bytes"),
        "seconds_per_step": sidecar.get("seconds_per_step"),
        "files": {name: record.get("bytes") for name, record in sidecar["files"].items()},
        "lineage": sidecar.get("lineage"),
    }


def stats_summary(checkpoint) -> dict[str, int]:
    """How many tensors each statistic covers, e.g. {"exp_avg_sq_row": 37, ...}."""
    if checkpoint.stats_file is None:
        return {}
    counts = Counter(key.split("/", 1)[0] for key in tensor_shapes(checkpoint.stats_file))
    return dict(sorted(counts.items()))
