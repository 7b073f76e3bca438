"""Curvature from training runs umtam did not drive: the Hugging Face Trainer, and Adam's own second moments.

``CurvatureCallback`` runs umtam's curvature tracker beside whatever optimizer a
``transformers.Trainer`` uses and, at every save, writes a umtam checkpoint
(weights, statistics, sidecar, config and tokenizer files) into
``<checkpoint-N>/umtam/``, which ``umtam prune``, ``merge`` and ``eval`` read
like one umtam trained::

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[curvature_callback("lm:mydata")])

``umtam.optim.UMTAM`` is a torch optimizer, so it plugs in the same way:
``Trainer(..., optimizers=(UMTAM(model.parameters(), lr=2e-4), scheduler))``.

``adam_statistics`` (umtam.adam_import, re-exported here) turns the
``exp_avg_sq`` a Trainer saved in ``optimizer.pt`` into umtam's statistics;
``umtam merge`` does that by itself for a plain Hugging Face input directory
that holds an optimizer.pt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from umtam.adam_import import adam_statistics, read_optimizer_state, trainer_parameter_order

__all__ = ["UMTAM_SUBDIR", "adam_statistics", "curvature_callback", "read_optimizer_state",
           "trainer_parameter_order", "write_trainer_checkpoint"]

UMTAM_SUBDIR = "umtam"


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
