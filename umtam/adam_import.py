"""Adam's second moments as umtam's statistics: experts fine-tuned elsewhere, merged with curvature.

``adam_statistics`` turns the ``exp_avg_sq`` a Hugging Face Trainer (or any
torch Adam) saved in ``optimizer.pt`` into umtam's statistics, so the merge
methods that read curvature (ota, umtam, fisher) run on experts umtam did not
train: OTA's own setting, Adam's second moments. Bias-corrected by each
parameter's own step and its group's beta2, then, for a parameter of rank >= 2
read as (shape[0], rest), its row and column means: the factored second moment
umtam's tracker keeps (the mean of an EMA is the EMA of the means, so the two
agree exactly on the same gradients); with ``keep_full`` the whole diagonal is
kept as well, as ``fisher/<name>``, for ``--saliency fisher`` and ``merge
--method fisher --option fisher=full``. The factored form is what a merge input
imports (``directory_statistics``): it is what every curvature method reads,
at a fraction of the memory.

``optimizer.pt`` is read with ``torch.load(weights_only=True)``: tensors and
numbers only, never a pickle's code. Its parameter indices are mapped to names
by rebuilding the Trainer's parameter order on a model built on the meta
device from config.json (no weights are read for that).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping as MappingABC
from pathlib import Path
from typing import Any, Iterator, Mapping

from umtam.errors import CheckpointError, first_line
from umtam.scores import col_key, fisher_key, row_key, vector_key

OPTIMIZER_FILE = "optimizer.pt"


def adam_statistics(optimizer_state: Mapping[str, Any], named_parameters: list[tuple[str, Any]], *,
                    where: str = "optimizer.pt", keep_full: bool = False) -> dict[str, Any]:
    """umtam's statistics from an Adam-like ``optimizer.state_dict()`` whose groups hold ``named_parameters``.

    ``named_parameters`` are the parameters in the order the optimizer's groups
    list them (``trainer_parameter_order`` rebuilds the Trainer's). Refused, in
    one CheckpointError naming ``where``: a state without ``exp_avg_sq`` (not
    Adam-like), or one whose indices or shapes do not fit the parameters.
    """
    import torch

    betas = _betas_by_index(optimizer_state, where)
    if len(betas) != len(named_parameters):
        raise CheckpointError(f"{where}: its groups hold {len(betas)} parameters, the model "
                              f"{len(named_parameters)}", hint="give the model the optimizer was built for")
    stats: dict[str, Any] = {}
    for index, entry in optimizer_state.get("state", {}).items():
        name, parameter = named_parameters[int(index)]
        second = entry.get("exp_avg_sq") if isinstance(entry, Mapping) else None
        if not isinstance(second, torch.Tensor):
            raise CheckpointError(f"{where}: parameter {index} ({name}) has no exp_avg_sq: not an Adam-like "
                                  "optimizer state", hint="only Adam, AdamW and their kin keep a second moment")
        if tuple(second.shape) != tuple(parameter.shape):
            raise CheckpointError(f"{where}: exp_avg_sq of parameter {index} has shape {list(second.shape)}, "
                                  f"but {name} is {list(parameter.shape)}", hint="give the model the optimizer "
                                                                                  "was built for")
        corrected = second.to(torch.float32) / (1.0 - betas[int(index)] ** _step(entry, where, index))
        stats.update(_factored(name, corrected))
        if keep_full and corrected.dim() >= 2:
            stats[fisher_key(name)] = corrected.contiguous()
    return stats


def _betas_by_index(optimizer_state: Mapping[str, Any], where: str) -> list[float]:
    betas: dict[int, float] = {}
    for group in optimizer_state.get("param_groups", []):
        pair = group.get("betas")
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise CheckpointError(f"{where}: a parameter group has no (beta1, beta2): not an Adam-like optimizer")
        betas.update({int(index): float(pair[1]) for index in group.get("params", [])})
    return [betas[index] for index in sorted(betas)]


def _step(entry: Mapping[str, Any], where: str, index: Any) -> float:
    step = entry.get("step")
    value = float(step.item() if hasattr(step, "item") else step) if step is not None else 0.0
    if value < 1:
        raise CheckpointError(f"{where}: parameter {index} has taken no step, so its second moment is empty")
    return value


def _factored(name: str, second: Any) -> dict[str, Any]:
    if second.dim() < 2:
        return {vector_key(name): second.reshape(-1).contiguous()}
    matrix = second.reshape(second.shape[0], -1)
    return {row_key(name): matrix.mean(dim=1), col_key(name): matrix.mean(dim=0)}


def trainer_parameter_order(model) -> list[tuple[str, Any]]:
    """The parameters in the order a ``Trainer``'s AdamW lists them: decaying ones first, then the rest.

    That is what ``Trainer.create_optimizer`` builds (its own
    ``get_decay_parameter_names``), so the indices of its ``optimizer.pt`` map
    onto these names.
    """
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # it reads nothing of the Trainer itself
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [item for item in trainable if item[0] in decay] + [item for item in trainable if item[0] not in decay]


def read_optimizer_state(path: str | Path) -> dict[str, Any]:
    """``optimizer.pt`` read with weights_only=True; a file that is not one is a one-line CheckpointError."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for a bad file
        raise CheckpointError(f"{path}: not a readable optimizer state ({first_line(exc, 200)})") from exc
    if not isinstance(state, dict) or "state" not in state or "param_groups" not in state:
        raise CheckpointError(f"{path}: not an optimizer state_dict (no 'state' and 'param_groups')")
    return state


# ----------------------------------------------------------------------------- a Trainer checkpoint directory


class ImportedStats(MappingABC):
    """The statistics of a directory's optimizer.pt, read (and converted) on first use only.

    A merge whose method reads no statistics never opens the file; the
    engine's merge threads share it, so it is read once, under a lock.
    """

    def __init__(self, directory: Path, config: Mapping[str, Any]):
        self._directory, self._config = directory, config
        self._stats: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _loaded(self) -> dict[str, Any]:
        with self._lock:
            if self._stats is None:
                path = self._directory / OPTIMIZER_FILE
                named = trainer_parameter_order(skeleton(self._directory, self._config))
                self._stats = adam_statistics(read_optimizer_state(path), named, where=str(path))
            return self._stats

    def __getitem__(self, key: str) -> Any:
        return self._loaded()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._loaded()))

    def __len__(self) -> int:
        return len(self._loaded())


def skeleton(directory: Path, config: Mapping[str, Any]):
    """The directory's model built on the meta device (names, shapes and module types; no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    architectures = config.get("architectures") or []
    causal = any(str(name).endswith("ForCausalLM") for name in architectures)
    factory = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return factory.from_config(AutoConfig.from_pretrained(directory, trust_remote_code=False))
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a config it cannot build
        raise CheckpointError(f"{directory / 'config.json'}: cannot build its model to map {OPTIMIZER_FILE}'s "
                              f"parameters ({first_line(exc, 160)})") from exc
