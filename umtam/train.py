"""Train a model on one task (GLUE, or causal language modelling) and write a checkpoint with its statistics.

Every optimizer runs beside a CurvatureTracker, so every checkpoint carries the
factorized second moments that pruning and merging reuse. The loop is plain
PyTorch: seeded data order per epoch, linear warmup then linear decay, gradient
clipping at 1.0 (as the Hugging Face Trainer does), evaluation on dev at the end.
With ``save_every`` it writes resumable states beside the output (umtam.resume);
a NaN or inf loss stops the run and names the last good state.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from umtam import __version__
from umtam.config.train import TrainConfig
from umtam.errors import DivergenceError, UmtamError, first_line
from umtam.progress import ProgressFn, no_progress

__all__ = ["TrainConfig", "StepEvent", "train", "warmup_then_linear_decay", "planned_steps"]


@dataclass
class StepEvent:
    """What the progress callback sees after each optimizer step."""

    step: int
    total_steps: int
    loss: float
    epoch: int


def train(config: TrainConfig, progress: ProgressFn = no_progress, *, resume_from: str | Path | None = None):
    """Run one training job end to end and return the written Checkpoint.

    The task's objective (umtam.objectives) decides the model (a classifier
    for GLUE, the causal LM for ``lm`` and ``sft``), its data and its scoring;
    the loop, optimizers, curvature tracker, states and checkpoint are shared.

    With ``config.save_every`` a resumable state is written every that many
    optimizer steps (umtam.resume describes the layout); ``resume_from`` (a
    state directory, or one step-N in it) continues such a run, and on CPU the
    result equals the uninterrupted run's bit for bit. A NaN or inf loss stops
    the run with an UmtamError naming the last good state; no checkpoint is
    written then.

    Under torchrun or accelerate launch (umtam.distributed) every rank trains on
    its shard of each global batch and rank 0 alone evaluates and writes; the
    other ranks return None.
    """
    import torch

    from umtam import atomic, checkpoint, distributed, models, resume
    from umtam.objectives import objective_for
    from umtam.optim import build_optimizer, effective_ranks, optimizer_hparams, optimizer_state_bytes
    from umtam.optim.tracker import CurvatureTracker
    from umtam.precision import precision_for
    from umtam.tasks import get_task
    from umtam.weights import model_tensors

    reset_peak_rss()  # this run's peak, not the process's
    # Cheap checks first (task, model location, output, device, states), so a mistake is
    # reported before minutes of data loading and tokenisation.
    spec = get_task(config.task)
    objective = objective_for(spec)
    source = models.resolve_model(config.model)  # a local lookup, no network
    tokenizer_source = models.tokenizer_source(source, config.tokenizer)
    inputs = _input_dirs(config, source, tokenizer_source)
    # an output inside the data or model directory would write there (and --force would delete them)
    atomic.check_output_dir(config.output, inputs=inputs, force=config.force)
    if config.plot_loss:
        from umtam.plots import agg_canvas

        agg_canvas()  # no matplotlib: say so now, not after the training
    context = distributed.from_environment()
    device = resolve_device(config.device, context.local_rank if context.enabled else None)
    precision = precision_for(config.dtype, device)
    saved = resume.find_state(resume_from) if resume_from is not None else None
    if saved is not None:
        resume.check_resumable(saved, config)
    states = (resume.StateWriter(resume.state_dir_for(config), output=config.output, force=config.force,
                                 resumed=saved, inputs=inputs)
              if config.save_every and context.is_main else None)
    progress("status", f"loading model {source.location}")
    # config.json first: a --max-length past its position table fails only once a long sentence comes
    model_config = models.load_config(source)
    max_length = models.fit_max_length(config.max_length, model_config, source)
    tokenizer = models.load_tokenizer(tokenizer_source, models.family_of_source(source))
    seed_everything(config.seed)
    prepared = objective.prepare(spec, config, tokenizer, max_length, progress)
    torch.manual_seed(config.seed)
    model = objective.build_model(source, spec, from_config=config.from_scratch)
    share_pad_token(model, tokenizer)
    base = _base(model, source, config, objective.ARCHITECTURE)
    model.float()  # fp32 master weights, whatever dtype the base is stored in (umtam.precision)
    distributed.setup(context, device.type)
    model.to(device)
    total_steps = planned_steps(len(prepared.train), config)

    family = _family(model)
    optimizer = build_optimizer(
        config.optimizer, list(model.named_parameters()), lr=config.learning_rate, rank=config.rank,
        betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
        error_feedback=config.error_feedback, dense_embeddings=config.dense_embeddings, dense_lr=config.dense_lr,
        is_embedding=family.is_embedding,
    )
    hparams = optimizer_hparams(optimizer)  # before the scheduler rewrites lr step by step
    dense = [kind for kind, wanted in (("fisher", config.track_fisher), ("trajectory", config.track_trajectory))
             if wanted]
    tracker = CurvatureTracker(model.named_parameters(), beta2=config.beta2, optimizer=optimizer, dense=dense)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(total_steps, config.warmup_ratio)
    )
    parts = resume.Trainables(model, optimizer, tracker, scheduler, precision.scaler)
    run_log = _RunLog(config, resume.Position())
    if saved is not None or states is not None:
        run_log.identity = resume.RunIdentity(base["fingerprint"], resume.features_digest(prepared.train),
                                              total_steps)
    if saved is not None:
        _continue_from(saved, parts, run_log, progress)
    def measure(features):
        with precision.autocast():
            return objective.evaluate(model, features, prepared.task_key, pad_token_id=tokenizer.pad_token_id,
                                      batch_size=config.eval_batch_size, progress=progress)

    def validate() -> dict[str, Any]:
        """Every validation split's metrics (evaluation leaves the model in eval mode)."""
        return {split: measure(features) for split, features in prepared.eval.items()}

    loop = _Loop(parts, objective, tokenizer.pad_token_id, precision, config, context, validate)
    try:
        run = _run_loop(loop, prepared.train, total_steps, progress, run_log, states)
    finally:
        if states is not None:
            states.close()  # releases the state directory's lock, whether the run finished or not
    if not context.is_main:
        distributed.teardown(context)
        return None

    progress("status", "evaluating")
    last = run.eval_curve[-1] if run.eval_curve else None
    # --eval-every's point at the last step scored this very model on the same rows: not again
    metrics = last["metrics"] if last is not None and last["step"] == run.steps else validate()
    holdout_metrics = measure(prepared.holdout) if prepared.holdout else None
    state = {"optimizer_bytes": optimizer_state_bytes(optimizer), "tracker_bytes": tracker.state_bytes()}
    if ranks := effective_ranks(optimizer, model.named_parameters()):  # --rank above min(m, n): clamped, said here
        state["clamped_ranks"] = ranks
    record = objective.task_record(spec, metrics, holdout_metrics, prepared)
    sidecar = _train_sidecar(config, prepared.task_key, record, base, run, hparams, state, run_log.resumed,
                             max_length)
    progress("status", f"writing {config.output}")
    extra_files = hf_files_of(model, tokenizer)
    if config.plot_loss:
        extra_files[LOSS_PLOT_FILE] = loss_plot(run.loss_curve, config)
    written = checkpoint.write_checkpoint(
        config.output, tensors=model_tensors(model), stats=tracker.stats(), sidecar=sidecar,
        extra_files=extra_files, force=config.force,
    )
    distributed.teardown(context)
    return written


def _input_dirs(config: TrainConfig, source, tokenizer_source) -> list[Path]:
    """What training reads (data, model, tokenizer): the output and its states stay out of them, and apart."""
    from umtam.lm_data import is_hub_reference

    texts = [place for place in (config.data, config.eval_data) if place is not None and not is_hub_reference(place)]
    places = [config.data_dir, *texts, *(s.location for s in (source, tokenizer_source) if s.origin == "directory")]
    return [Path(place) for place in places if place is not None]


def share_pad_token(model, tokenizer) -> None:
    """A decoder's classification head reads the last non-padding token: its config must know the pad id."""
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _base(model, source, config: TrainConfig, architecture: str) -> dict[str, Any]:
    """The base record, fingerprinted as the weights were loaded (in their stored dtype), before training."""
    from umtam.base_model import base_record
    from umtam.heads import encoder_tensors
    from umtam.weights import model_tensors

    return base_record(source, encoder_tensors(model_tensors(model), _family(model)), config.seed,
                       architecture=architecture, from_config=config.from_scratch)


def _family(model):
    from umtam.families import family_of

    return family_of(model.config)


def hf_files_of(model, tokenizer) -> dict[str, bytes]:
    from umtam.hf_interop import hf_files

    return hf_files(model, tokenizer)


def seed_everything(seed: int) -> None:
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int | None = None):
    """The torch device for ``--device``; under a launcher, CUDA means this rank's own GPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UmtamError(f"device {name} requested but CUDA is not available")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def planned_steps(num_examples: int, config: TrainConfig) -> int:
    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    total = math.ceil(steps_per_epoch * config.epochs)
    return min(total, config.max_steps) if config.max_steps else total


def warmup_then_linear_decay(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over warmup_ratio of the steps, then linear decay to 0."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return multiplier


@dataclass
class RunRecord:
    steps: int
    seconds_per_step: float
    final_loss: float
    loss_curve: list[float]
    peak_rss_bytes: int
    peak_gpu_bytes: int | None
    eval_curve: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _RunLog:
    """Where the loop starts, and what a state records about the run besides the trainables."""

    config: TrainConfig
    position: Any  # umtam.resume.Position
    identity: Any = None  # umtam.resume.RunIdentity, when states are written or read
    resumed: list[dict[str, Any]] = field(default_factory=list)
    earlier_seconds_per_step: float | None = None

    def state_record(self, seconds_per_step: float | None) -> dict[str, Any]:
        return {
            "config": self.config.state_record(),
            "base_fingerprint": self.identity.base_fingerprint,
            "train_digest": self.identity.train_digest,
            "total_steps": self.identity.total_steps,
            "resumed": self.resumed,
            "seconds_per_step": seconds_per_step if seconds_per_step is not None else self.earlier_seconds_per_step,
        }


def _continue_from(saved, parts, log: _RunLog, progress: ProgressFn) -> None:
    """Load a saved state into the freshly built run, so the loop starts where that run stopped."""
    from umtam import resume

    resume.check_same_run(saved, log.identity)
    progress("status", f"resuming from {saved.path} (step {saved.step} of {log.identity.total_steps})")
    lr = log.config.learning_rate
    log.position = resume.restore(saved, parts, lr=lr)
    log.resumed = [*saved.record.get("resumed", []), {"step": saved.step, "state": str(saved.path), "lr": lr}]
    log.earlier_seconds_per_step = saved.record.get("seconds_per_step")


class _StepTimer:
    """Seconds per step in this process, leaving out its first step (which pays one-off warm-up costs)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.steps = 0
        self.first = 0.0

    def tick(self) -> None:
        self.steps += 1
        if self.steps == 1:
            now = time.perf_counter()
            self.started, self.first = now, now - self.started

    def seconds_per_step(self) -> float | None:
        if self.steps <= 1:
            return self.first if self.steps else None
        return (time.perf_counter() - self.started) / (self.steps - 1)


@dataclass
class _Loop:
    """What one optimizer step needs besides the batch."""

    parts: Any  # umtam.resume.Trainables
    objective: Any  # the task's objective module (umtam.objectives)
    pad_token_id: int
    precision: Any  # umtam.precision.Precision
    config: TrainConfig
    context: Any  # umtam.distributed context
    validate: Callable[[], dict[str, Any]]  # the validation splits' metrics now (--eval-every)


def _run_loop(loop: _Loop, features, total_steps, progress, log: _RunLog, states) -> RunRecord:
    import torch

    from umtam import batching, distributed

    parts, config, context = loop.parts, loop.config, loop.context
    model = parts.model
    forward = distributed.wrap(model, context)  # DDP all-reduces the gradients during backward
    model.train()
    device = next(model.parameters()).device
    position = log.position
    if device.type == "cuda":  # this run's peak, not that of runs before it in the process
        torch.cuda.reset_peak_memory_stats(device)
    progress("start", {"total": total_steps, "what": "train"})
    timer = _StepTimer()
    while position.step < total_steps:
        order = batching.batch_order(len(features), config.batch_size, seed=config.seed, epoch=position.epoch)
        for indices in order[position.batch:]:
            shard, factor = context.shard(indices)
            batch = loop.objective.collate([features[i] for i in shard], loop.pad_token_id)
            with loop.precision.autocast():
                loss = loop.objective.train_loss(forward, {key: value.to(device) for key, value in batch.items()})
            if context.enabled:  # weight this rank's mean so DDP's average is the global batch's mean
                loss = loss * factor
            batch_loss = distributed.global_mean(loss, context)  # the same on every rank
            if not math.isfinite(batch_loss):
                raise _diverged(position.step + 1, f"loss is {batch_loss}", states, config)
            _backward_and_step(loop, loss, position.step + 1, states)
            position.advance(batch_loss)  # a Python float: the GPU has synced, so the timing is honest
            timer.tick()
            if config.eval_every and position.step % config.eval_every == 0 and context.is_main:
                # before a state is saved at this step, so a run resumed from it has this point
                _validate(loop, position, progress)
            if states is not None and position.step % config.save_every == 0:  # rank 0 only
                _save_state(parts, log, states, timer, progress)
            progress("step", StepEvent(position.step, total_steps, position.loss_curve[-1], position.epoch))
            if position.step >= total_steps:
                break
        else:  # the epoch ran out before the planned steps did
            position.next_epoch()
    progress("end", {"what": "train"})
    _check_weights_finite(model, position.step, states, config)  # the last update has met no loss yet
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    losses = position.loss_curve
    seconds = timer.seconds_per_step()
    return RunRecord(position.step, seconds if seconds is not None else log.earlier_seconds_per_step or 0.0,
                     float(sum(losses[-10:]) / len(losses[-10:])), list(losses), peak_rss_bytes(), gpu_peak,
                     list(position.eval_curve))


def _backward_and_step(loop: _Loop, loss, step: int, states) -> None:
    """Backward, clip, track the curvature and step; fp16 scales the loss and skips an overflowed step."""
    import torch

    parts, config = loop.parts, loop.config
    scaler = parts.scaler
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(parts.optimizer)  # clipping and the tracker see the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), config.max_grad_norm)
    if not torch.isfinite(grad_norm):
        if scaler is None:  # the step would write NaN into every weight
            raise _diverged(step, f"gradient norm is {grad_norm.item()}", states, config)
        # fp16's gradients overflowed at this loss scale: the step is skipped and the scale lowered
        # (GradScaler's rule); the statistics skip it too, as the optimizer does.
        scaler.step(parts.optimizer)
        scaler.update()
    else:
        parts.tracker.update()
        if scaler is not None:
            scaler.step(parts.optimizer)
            scaler.update()
        else:
            _optimizer_step(parts.optimizer, step, states, config)
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)


def _optimizer_step(optimizer, step: int, states, config: TrainConfig) -> None:
    try:
        optimizer.step()
    except RuntimeError as exc:
        # torch's optimizers turn lr / bias correction into a float32 scalar: a huge --lr
        # overflows there ("value cannot be converted to type float without overflow").
        if "overflow" not in str(exc):
            raise
        raise _diverged(step, f"the update overflowed float32 ({first_line(exc, 120)})", states, config) from exc


def _validate(loop: _Loop, position, progress) -> None:
    """Score the validation splits mid-run; eval mode draws no random numbers, so training is unchanged."""
    scores = loop.validate()
    loop.parts.model.train()
    position.eval_curve.append({"step": position.step, "metrics": scores})
    progress("status", f"step {position.step}: " + "; ".join(
        f"{split} " + ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        for split, metrics in scores.items()))


def _check_weights_finite(model, step: int, states, config: TrainConfig) -> None:
    """Weights a loss has not been computed on yet can hold NaN or inf unseen: stop as a divergence."""
    from umtam import resume

    if not resume.weights_finite(model):
        raise _diverged(step, "weights hold NaN or inf", states, config)


def _save_state(parts, log: _RunLog, states, timer: _StepTimer, progress) -> None:
    from umtam import resume

    # a NaN the loss has not shown yet must not become the "last good" state
    _check_weights_finite(parts.model, log.position.step, states, log.config)
    record, tensors = resume.capture(parts, log.position)
    saved = states.save({**record, **log.state_record(timer.seconds_per_step())}, tensors)
    progress("status", f"saved training state {saved.path}")


def _diverged(step: int, what: str, states, config: TrainConfig) -> DivergenceError:
    from umtam import resume

    latest = states.latest if states is not None else None
    directory = states.directory if states is not None else None
    return resume.diverged_error(step, what, latest, directory, config.learning_rate)


def reset_peak_rss() -> None:
    """Start the peak resident set size afresh where Linux allows it (VmHWM, reset by clear_refs 5).

    A driver that trains many runs in one process (bench/lm_grid.py) would
    otherwise report every run at the largest peak of any run before it.
    """
    from pathlib import Path

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak stays the process's
        pass


def peak_rss_bytes() -> int:
    """Peak resident set size since reset_peak_rss (Linux VmHWM), else of the whole process (ru_maxrss)."""
    import resource
    import sys
    from pathlib import Path

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


LOSS_PLOT_FILE = "loss_curve.png"


def loss_plot(loss_curve: list[float], config: TrainConfig) -> bytes:
    """The per-step training loss and its moving average, as PNG bytes (written with the checkpoint)."""
    from umtam.plots import loss_curves_png

    label = f"{config.optimizer}" + (f" r={config.rank}" if config.optimizer != "adamw" else "")
    return loss_curves_png({f"{label}, lr {config.learning_rate:g}": loss_curve},
                           title=f"{config.task}: training loss")


def _train_sidecar(config, task_key: str, task_record: dict[str, Any], base, run: RunRecord, hparams,
                   state: dict[str, int], resumed: list[dict[str, Any]], max_length: int):
    return {
        "kind": "train",
        "umtam_version": __version__,
        "tasks": {task_key: task_record},
        "base_model": base,
        # state_bytes counts everything training kept beside the weights: the
        # optimizer's state plus whatever the curvature tracker holds itself.
        "optimizer": {"name": config.optimizer, "hyperparameters": hparams,
                      "state_bytes": state["optimizer_bytes"] + state["tracker_bytes"], **state},
        "training": {
            "config": {**config.sidecar_record(), "max_length": max_length},  # the length used, when defaulted
            "final_loss": run.final_loss,
            "loss_curve": run.loss_curve,
            **({"eval_curve": run.eval_curve} if run.eval_curve else {}),
            **({"resumed": resumed} if resumed else {}),
        },
        "stats": {"beta2": config.beta2, "bias_corrected": True, "tracked_steps": run.steps},
        "steps": run.steps,
        "seed": config.seed,
        "peak_rss_bytes": run.peak_rss_bytes,
        "peak_gpu_bytes": run.peak_gpu_bytes,
        "seconds_per_step": run.seconds_per_step,
        "lineage": {"inputs": [], "operation": "train"},
    }
