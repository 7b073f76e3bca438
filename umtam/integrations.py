"""Curvature from training runs umtam did not drive: the Hugging Face Trainer, and Adam's own second moments.

``CurvatureCallback`` runs umtam's curvature tracker beside whatever optimizer a
``transformers.Trainer`` uses and, at every save, writes a umtam checkpoint
(weights, statistics, sidecar, config and tokenizer files) into
``<checkpoint-N>/umtam/``, which ``umtam prune``, ``merge`` and ``eval`` read
like one umtam trained::

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[CurvatureCallback(task="lm:mydata")])

``umtam.optim.UMTAM`` is a torch optimizer, so it plugs in the same way:
``Trainer(..., optimizers=(UMTAM(model.parameters(), lr=2e-4), scheduler))``.

``adam_statistics`` turns the ``exp_avg_sq`` a Trainer (or any torch Adam)
saved in ``optimizer.pt`` into umtam's statistics, so experts fine-tuned
elsewhere can be merged with the methods that read curvature (OTA's own
setting: Adam's second moments). Bias-corrected by each parameter's own step
and the group's beta2, then, for a parameter of rank >= 2 read as
(shape[0], rest), its row and column means: the factored second moment umtam's
tracker keeps (the mean of an EMA is the EMA of the means, so the two agree
exactly on the same gradients); with ``keep_full`` the whole diagonal is kept
as well, as ``fisher/<name>``, for ``--saliency fisher`` and
``merge --method fisher --option fisher=full``. ``optimizer.pt`` is read with
``torch.load(weights_only=True)``: tensors and numbers only, never a pickle's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from umtam.errors import CheckpointError, first_line
from umtam.scores import col_key, fisher_key, row_key, vector_key

UMTAM_SUBDIR = "umtam"


# ----------------------------------------------------------------------------- Adam's second moments


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


# ----------------------------------------------------------------------------- the Trainer callback


def curvature_callback(task: str, **kwargs):
    """A ``CurvatureCallback`` (the class is built on first use, so importing umtam needs no transformers)."""
    return _callback_class()(task, **kwargs)


def _callback_class():
    from transformers import TrainerCallback

    class CurvatureCallback(TrainerCallback):
        """Tracks curvature beside the Trainer's optimizer; writes a umtam checkpoint at every save."""

        def __init__(self, task: str, *, beta2: float = 0.999, label_names: list[str] | None = None):
            self.task, self.beta2, self.label_names = task, beta2, list(label_names or [])
            self.tracker, self.base = None, None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            from umtam.optim.tracker import CurvatureTracker

            self.tracker = CurvatureTracker(model.named_parameters(), beta2=self.beta2, optimizer=optimizer)
            self.base = _base_record(model)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.tracker.update()  # after the Trainer clipped the gradients, before the step, as umtam train

        def on_save(self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / UMTAM_SUBDIR
            write_trainer_checkpoint(folder, model, processing_class, self.tracker, self.base, self.task,
                                     self.label_names, state, optimizer)

    return CurvatureCallback


def _base_record(model) -> dict[str, Any]:
    """The base record of the model the Trainer starts from, before its first step."""
    from umtam.base_model import fingerprint
    from umtam.families import family_of
    from umtam.heads import encoder_tensors
    from umtam.weights import model_tensors

    reference = getattr(model.config, "_name_or_path", "") or None
    encoder = encoder_tensors(model_tensors(model), family_of(model.config))
    return {"reference": reference, "location": reference, "origin": "directory" if reference and
            Path(reference).is_dir() else "hub", "fingerprint": fingerprint(encoder), "init_seed": 0,
            "architecture": "causal-lm" if model.can_generate() else "sequence-classification"}


def write_trainer_checkpoint(folder: Path, model, tokenizer, tracker, base: Mapping[str, Any], task: str,
                             label_names: list[str], state, optimizer) -> None:
    from umtam import __version__
    from umtam.checkpoint import write_checkpoint
    from umtam.hf_interop import hf_files
    from umtam.optim import optimizer_hparams, optimizer_state_bytes
    from umtam.weights import model_tensors

    # the Trainer hands over accelerate's wrapper; the sidecar names the optimizer inside it
    optimizer = getattr(optimizer, "optimizer", optimizer)
    sidecar = {
        "kind": "train",
        "umtam_version": __version__,
        "tasks": {task: {"label_names": label_names, "is_regression": False, "metrics": {}}},
        "base_model": dict(base),
        "optimizer": {"name": type(optimizer).__name__, "hyperparameters": optimizer_hparams(optimizer),
                      "optimizer_bytes": optimizer_state_bytes(optimizer), "tracker_bytes": tracker.state_bytes(),
                      "state_bytes": optimizer_state_bytes(optimizer) + tracker.state_bytes()},
        "stats": {"beta2": tracker.beta2, "bias_corrected": True, "tracked_steps": int(state.global_step)},
        "steps": int(state.global_step),
        "lineage": {"inputs": [], "operation": "hf-trainer"},
    }
    extra = hf_files(model, tokenizer)
    write_checkpoint(folder, tensors=model_tensors(model), stats=tracker.stats(), sidecar=sidecar,
                     extra_files=extra, force=True)
