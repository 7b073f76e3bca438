"""What `umtam inspect` reports about a checkpoint, as plain data.

Shapes come from the safetensors headers, so a summary reads no tensor data
beyond what the hash check in load_checkpoint already streamed. The saliency
breakdown (umtam.saliency_map) is the exception and is opt-in: it loads the
weights and rebuilds the base model, so only ``summarize(..., saliency=True)``
pays for it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from umtam.scores import INSPECT_SCORES


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def summarize(checkpoint, *, saliency: bool = False, keep: float = 0.05, base: str | None = None,
              scores: Sequence[str] = INSPECT_SCORES) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint (the keys are documented in README).

    With ``saliency`` it adds "saliency": where the top-``keep`` entries of each
    score sit by layer and module type (saliency_map.saliency_breakdown; ``base``
    overrides where the base model is found).
    """
    from umtam.families import family_of_dir
    from umtam.heads import check_head_labels, is_head_key

    sidecar = checkpoint.sidecar
    shapes = checkpoint.tensor_shapes()
    family = family_of_dir(checkpoint.path)
    check_head_labels(checkpoint, shapes, family)  # labels listed that the head cannot produce, or the reverse
    encoder = {k: s for k, s in shapes.items() if not is_head_key(k, family)}
    summary = {
        "path": str(checkpoint.path),
        "kind": checkpoint.kind,
        "schema_version": sidecar.schema_version,
        "tasks": {name: task_summary(record.as_json()) for name, record in checkpoint.tasks.items()},
        "base_model": sidecar.base_model.as_json(),
        "parameters": {"total": sum(_numel(s) for s in shapes.values()),
                       "encoder": sum(_numel(s) for s in encoder.values()),
                       "tensors": len(shapes)},
        "stats": stats_summary(checkpoint),
        "optimizer": sidecar.optimizer.as_json() if sidecar.optimizer else None,
        "steps": sidecar.steps,
        "seed": sidecar.seed,
        "peak_rss_bytes": sidecar.peak_rss_bytes,
        "seconds_per_step": sidecar.seconds_per_step,
        "files": {name: record.bytes for name, record in sidecar.files.items()},
        "lineage": lineage_summary(checkpoint),
    }
    if saliency:
        from umtam.saliency_map import saliency_breakdown

        summary["saliency"] = saliency_breakdown(checkpoint, scores=scores, keep=keep, base=base)
    return summary


def task_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """Labels and metrics of one task (a language task: the text it trained on); a merged task's expert's too."""
    summary = {"labels": record["label_names"], "is_regression": record.get("is_regression", False),
               "metrics": record.get("metrics", {})}
    if record.get("data_name") is not None:  # a language task (umtam.objectives.language)
        summary["text"] = {"train": record.get("data_source"),
                           "validation": record.get("eval_data") or (
                               f"{record.get('eval_holdout_fraction')} of the training text held out")}
    if "expert_metrics" in record:
        summary["expert_metrics"] = record["expert_metrics"]
    return summary


def lineage_summary(checkpoint) -> Any:
    """Where a prune or merge came from, in one shape for both kinds.

    {"method", "options", "inputs": [{"path", "sha256", "tasks"}], "tasks", ...}
    plus every other lineage field as recorded (method_url, thresholds,
    threshold, kept_fraction). A prune records its options under "method"; here
    its method is "prune" and those are its options, so "method" is always a
    name. Other kinds (train) keep the sidecar's lineage unchanged.
    """
    raw = checkpoint.sidecar.lineage.as_json() if checkpoint.sidecar.lineage else None
    if checkpoint.kind not in ("merge", "prune") or not isinstance(raw, dict):
        return raw
    tasks = list(checkpoint.tasks)
    if checkpoint.kind == "prune":
        recorded = raw.get("method")
        method, options = "prune", recorded if isinstance(recorded, dict) else {}
    else:
        method, options = raw.get("method"), raw.get("options") or {}
    # A prune keeps its input's tasks, so its single input carries all of them.
    inputs = [{"path": item.get("path"), "sha256": item.get("sha256"),
               "tasks": item.get("tasks", tasks if checkpoint.kind == "prune" else [])}
              for item in raw.get("inputs", [])]
    extra = {key: value for key, value in raw.items() if key not in ("method", "options", "inputs")}
    return {"method": method, "options": options, "inputs": inputs, "tasks": tasks, **extra}


def stats_summary(checkpoint) -> dict[str, int]:
    """How many tensors each statistic covers, e.g. {"exp_avg_sq_row": 37, ...}."""
    from umtam.safetensors_io import tensor_shapes

    if checkpoint.stats_file is None:
        return {}
    counts = Counter(key.split("/", 1)[0] for key in tensor_shapes(checkpoint.stats_file))
    return dict(sorted(counts.items()))
