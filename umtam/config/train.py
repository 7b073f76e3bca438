"""`umtam train`'s options: one declaration each (default, range, help, recording, resume)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, model_validator

from umtam.config.schema import COUNT_LIMIT, FLOAT32_MAX, SEED_LIMIT, PathText, Schema, option, registered
from umtam.models import DEFAULT_MODEL
from umtam.optim.registry import OPTIMIZERS
from umtam.precision import DTYPES
from umtam.tasks import TASKS

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _device(name: str) -> str:
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"must be auto, cpu or cuda[:N], got {name!r}")
    return name


# Fine-tuning runs 1-20 epochs; ten thousand leaves room for tiny subsets and keeps
# the planned step count (epochs x steps per epoch) a number a run can reach:
# 1e300 epochs would plan a 300-digit step count and train until killed.
EPOCHS_LIMIT = 1e4


def _dtype(name: str) -> str:
    if name not in DTYPES:
        raise ValueError(f"must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


def _default_lrs() -> str:
    return "the optimizer's, listed below"


# Optimizer options whose default is None (off): given at all, they ask for something.
_SET_MEANS_ON = ("dense_lr",)


class TrainConfig(Schema):
    """Fine-tune one task. Recorded fields go into the sidecar's training.config; a resumed run must match
    the saved run's on every field but the resumable ones."""

    task: Annotated[str, registered(TASKS)] = option(help="Task name (listed below).", metavar="TASK")
    output: PathText = option(help="Checkpoint directory to create.", short="-o", recorded=False, resumable=True)
    model: PathText = option(DEFAULT_MODEL, help="Hugging Face model id or local directory.",
                        default_text="all-MiniLM-L6-v2")
    optimizer: Annotated[str, registered(OPTIMIZERS)] = option("adamw", help="Optimizer (listed below).",
                                                               metavar="NAME")
    rank: int = option(8, ge=1, le=COUNT_LIMIT, help="Rank of the low-rank momentum / projection.")
    lr: float | None = option(None, gt=0, le=FLOAT32_MAX, resumable=True, help="Peak learning rate.",
                              default_text=_default_lrs())
    epochs: float = option(3.0, gt=0, le=EPOCHS_LIMIT, help="Training epochs.")
    max_steps: int | None = option(None, ge=1, le=COUNT_LIMIT, help="Stop after this many optimizer steps.")
    batch_size: int = option(32, ge=1, le=COUNT_LIMIT, help="Training batch size.")
    max_length: int | None = option(None, ge=1, le=COUNT_LIMIT, help="Truncate inputs to this many tokens.",
                                    default_text="128, or the model's positions if fewer")
    seed: int = option(42, ge=0, lt=SEED_LIMIT, help="Seed for data order, subsampling and head init.")
    weight_decay: float = option(0.01, ge=0, le=FLOAT32_MAX, help="Decoupled weight decay.")
    beta1: float = option(0.9, ge=0, lt=1, help="Momentum decay.")
    beta2: float = option(0.999, ge=0, lt=1, help="Second-moment decay, also the curvature tracker's.")
    warmup_ratio: float = option(0.06, ge=0, lt=1, help="Fraction of steps for linear warmup.")
    max_grad_norm: float = option(1.0, gt=0, le=FLOAT32_MAX,
                                  help="Clip the global gradient norm to this (as the HF Trainer).")
    error_feedback: bool = option(False, flag="--error-feedback/--no-error-feedback",
                                  help="UMTAM's dense error-feedback buffer.")
    dense_embeddings: bool = option(False, flag="--dense-embeddings/--lowrank-embeddings",
                                    help="UMTAM: dense AdamW state for the embedding matrices instead of low-rank.")
    dense_lr: float | None = option(None, gt=0, le=FLOAT32_MAX,
                                    help="Low-rank optimizers: the peak rate of the parameters they keep dense "
                                         "(vectors: biases, LayerNorm; and --dense-embeddings' matrices).",
                                    default_text="--lr")
    track_fisher: bool = option(False, flag="--track-fisher",
                                help="Also record the dense Fisher diagonal (EMA of G^2, 4 bytes per weight) for "
                                     "--score fisher.")
    track_trajectory: bool = option(False, flag="--track-trajectory",
                                    help="Also record the trajectory saliency, EMA of ((W_t - W0) G_t)^2 (8 bytes per "
                                         "weight), for --score trajectory.")
    max_train_samples: int | None = option(None, ge=1, le=COUNT_LIMIT, help="Subsample the training set (seeded).")
    max_eval_samples: int | None = option(None, ge=1, le=COUNT_LIMIT, help="Subsample the dev set (seeded).")
    holdout_fraction: float = option(0.0, ge=0, lt=1,
                                     help="Hold out this fixed fraction of train and report metrics on it "
                                          "(for tuning without dev).")
    eval_batch_size: int = option(64, ge=1, le=COUNT_LIMIT, resumable=True, help="Evaluation batch size.")
    eval_every: int | None = option(None, ge=1, le=COUNT_LIMIT, resumable=True,
                                    help="Also score the validation split every N steps (loss for a language "
                                         "task), recorded as training.eval_curve; weights are unchanged.")
    data_dir: PathText | None = option(None, resumable=True, metavar="DIRECTORY",
                                  help="GLUE directory (TSV or parquet layout).")
    data: PathText | None = option(None, resumable=True, metavar="TEXT",
                                   help="lm, sft, choice: text to train on: a .txt, .jsonl or parquet file, a directory "
                                        "of them, or a hub dataset id (name[:split]).")
    eval_data: PathText | None = option(None, resumable=True, metavar="TEXT",
                                        help="lm, sft, choice: validation text, as --data (else --holdout-fraction of "
                                             "--data).")
    from_scratch: bool = option(False, flag="--from-scratch",
                                help="Initialise from --model's config.json alone (seeded), not its weights.")
    tokenizer: PathText | None = option(None, metavar="MODEL",
                                        help="Tokenizer directory or hub id.", default_text="--model's")
    dtype: Annotated[str, AfterValidator(_dtype)] = option(
        "fp32", metavar="DTYPE", help="fp32, bf16 or fp16: autocast compute, fp32 master weights and optimizer "
                                      "(bf16: CUDA or a CPU with native bf16; fp16: CUDA).")
    device: Annotated[str, AfterValidator(_device)] = option(
        "auto", resumable=True, help="auto, cpu or cuda[:N] (auto: CUDA when available).")
    save_every: int | None = option(None, ge=1, le=COUNT_LIMIT, recorded=False, resumable=True,
                                    help="Write a resumable training state every N optimizer steps.")
    state_dir: PathText | None = option(None, recorded=False, resumable=True, metavar="DIRECTORY",
                                   help="Where --save-every writes states.", default_text="OUTPUT-state")
    plot_loss: bool = option(False, flag="--plot-loss", recorded=False, resumable=True,
                             help="Also write loss_curve.png (per-step loss and its moving average) "
                                  "into the checkpoint.")
    force: bool = option(False, flag="--force", recorded=False, resumable=True, saved=False,
                         help="Replace an existing output directory (and another run's states in the state "
                              "directory).")

    @model_validator(mode="after")
    def _switches_the_optimizer_takes(self) -> "TrainConfig":
        # A switch turned on for an optimizer without it would silently do nothing: refused.
        # Numbers it does not read (rank for adamw) are recorded and ignored, as recipes set them.
        spec = OPTIMIZERS.get(self.optimizer)
        specific = dict.fromkeys(option for other in OPTIMIZERS for option in other.options)
        wrong = [name for name in specific if name not in spec.options
                 and (getattr(self, name) is True or name in _SET_MEANS_ON and getattr(self, name) is not None)]
        if wrong:
            takers = {name: ", ".join(o.name for o in OPTIMIZERS if name in o.options) for name in wrong}
            raise ValueError("; ".join(f"{name} is an option of the {takers[name]} optimizer, not {spec.name!r}"
                                       for name in wrong))
        return self

    @model_validator(mode="after")
    def _data_the_task_reads(self) -> "TrainConfig":
        # GLUE reads --data-dir, a language task --data: the other one would silently do nothing.
        language = TASKS.get(self.task).kind == "language"
        if language and self.data_dir is not None:
            raise ValueError(f"--data-dir is for GLUE tasks; --task {self.task} reads --data")
        if not language and (self.data is not None or self.eval_data is not None):
            raise ValueError(f"--data and --eval-data are for the lm and sft tasks; --task {self.task} reads "
                             "GLUE from --data-dir")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else OPTIMIZERS.get(self.optimizer).default_lr

    def sidecar_record(self) -> dict[str, Any]:
        """What the sidecar's training.config holds: the recorded fields, lr as it was used."""
        return {**self.recorded(), "lr": self.learning_rate}

    def state_record(self) -> dict[str, Any]:
        """What a training state keeps to rebuild this config on resume (not --force: it must be asked again)."""
        infos = self.options()
        return {name: value for name, value in self.model_dump().items() if infos[name].saved}

    @classmethod
    def resumable_options(cls) -> tuple[str, ...]:
        return tuple(name for name, info in cls.options().items() if info.resumable)
