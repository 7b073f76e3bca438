"""The merged checkpoint's sidecar: the union of the tasks, the shared base, and the lineage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from umtam.sidecar import Sidecar

if TYPE_CHECKING:
    from umtam.merge.base import MergeMethod
    from umtam.merge.inputs import Source


def merged_sidecar(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[Source],
                   thresholds: dict[str, float] | None, base_record: Mapping[str, Any],
                   base_checks: Mapping[str, float]) -> dict[str, Any]:
    """Everything of the sidecar but schema_version and files (write_checkpoint adds those).

    Each task keeps its expert's scores as expert_metrics (TaskRecord.unevaluated);
    the lineage names the inputs with the sha256 of their weights, the method,
    its paper and its options, and a global trim's per-input thresholds.
    """
    tasks = {task: record.unevaluated().as_json() for source in sources
             for task, record in source.checkpoint.tasks.items()}
    lineage: dict[str, Any] = {
        "inputs": [_lineage_input(source, base_checks) for source in sources],
        "method": spec.name,
        "method_url": spec.url,
        "options": dict(options),
    }
    if thresholds is not None:
        lineage["thresholds"] = thresholds
    return {"kind": "merge", "tasks": tasks, "base_model": dict(base_record), "lineage": lineage}


def _lineage_input(source: Source, base_checks: Mapping[str, float]) -> dict[str, Any]:
    """An input as the lineage records it; a plain one says how its base was checked."""
    sidecar: Sidecar = source.checkpoint.sidecar
    item: dict[str, Any] = {
        "path": str(source.checkpoint.path.resolve()),
        "sha256": sidecar.weights_sha256(),
        "tasks": list(source.checkpoint.tasks),
    }
    if source.plain:
        item["format"] = sidecar.format
        item["base_check"] = {"fingerprint": False, "keys_and_shapes": True,
                              "relative_distance": base_checks[source.label]}
    return item
