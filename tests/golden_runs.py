"""Seeded tiny runs of every stage, through the real CLI, whose outputs are pinned by sha256.

The redesign of issue 12 had to leave behaviour unchanged: these runs were
recorded before it started (``python tests/golden_runs.py --record``) and
tests/test_golden.py reruns them and compares. Only the weights and the
statistics are hashed; sidecars are pinned separately (tests/golden/*.json)
because they record times, paths and memory.

    train     every optimizer (and umtam's --error-feedback / --dense-embeddings),
              20 steps on the tiny MRPC fixture, loss curve kept as well
    prune     the umtam run, curvature/global and magnitude/tensor
    merge     every method with its defaults (and ties, umtam with --scope
              global) on three seeded experts of one tiny base

The values hold for the dependency versions pyproject allows (torch 2.13 CPU,
transformers <= 5.24, safetensors <= 0.8); a change of either kind of library
that moves them is a real change of umtam's outputs and needs a new recording.
They also depend on how many threads torch splits a reduction over, so the runs
pin it (RECORDED_THREADS, what they were recorded with) whatever OMP_NUM_THREADS
says, and on the CPU: the same float32 program rounds differently in its last
bits on another kind of CPU (AVX-512 against AVX2 kernels, MKL's Intel and AMD
paths; ATEN_CPU_CAPABILITY does not make one kind reproduce another). So the
bytes are recorded per kind of machine: the original record, and under
``machines`` each kind added since (``--record-machine LABEL``); a run must
equal one of them exactly. Loss curves and sidecars, which are read as numbers,
are compared with the tolerance that cross-CPU rounding needs (test_golden.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "golden" / "outputs.json"
# One sidecar per kind, as written by these runs, with run-specific values masked (normalized_sidecar).
SIDECARS = {"train": "train/umtam", "prune": "prune/curvature-global", "merge": "merge/umtam"}
# Measured, not computed: they differ from run to run.
VOLATILE = ("peak_rss_bytes", "seconds_per_step")
RECORDED_THREADS = 2  # the 2-core machines the record was made and CI runs on
OUTPUT_STAGES = ("train", "prune", "merge")  # whose files are pinned by sha256, per kind of machine

TRAIN_RUNS = {
    "adamw": [],
    "adafactor": [],
    "galore": [],
    "mofasgd": [],
    "umtam": [],
    "umtam-error-feedback": ["--error-feedback"],
    "umtam-dense-embeddings": ["--dense-embeddings"],
}
PRUNE_RUNS = {
    "curvature-global": ["--keep", "0.3", "--score", "curvature"],
    "magnitude-tensor": ["--keep", "0.3", "--score", "magnitude", "--scope", "tensor"],
}
MERGE_RUNS = {
    "average": ["--method", "average"],
    "task-arithmetic": ["--method", "task-arithmetic"],
    "ties": ["--method", "ties"],
    "ties-tensor": ["--method", "ties", "--scope", "tensor"],
    "dare": ["--method", "dare"],
    "dare-ties": ["--method", "dare-ties"],
    "fisher": ["--method", "fisher"],
    "ota": ["--method", "ota"],
    "umtam": ["--method", "umtam"],
    "umtam-global": ["--method", "umtam", "--scope", "global", "--keep", "0.3"],
}


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def file_hashes(directory: Path) -> dict[str, str | None]:
    return {name: sha256(directory / name) for name in ("model.safetensors", "stats.safetensors")}


def normalized_sidecar(directory: Path, root: Path) -> dict:
    """The sidecar with the run's scratch root written as <root> and measured values as <volatile>."""
    text = (directory / "umtam.json").read_text().replace(str(root), "<root>")
    sidecar = json.loads(text)
    for key in VOLATILE:
        if sidecar.get(key) is not None:
            sidecar[key] = "<volatile>"
    return sidecar


def recorded_outputs(record: dict, stage: str, run: str) -> list[dict]:
    """Every recorded kind of machine's file hashes for one run: the original record first."""
    return [record[stage][run], *(machine[stage][run] for machine in record.get("machines", {}).values())]


def golden_sidecar_path(kind: str) -> Path:
    return HERE / "golden" / f"umtam.{kind}.json"


def train_args(optimizer_run: str, model: Path, glue: Path, output: Path) -> list[str]:
    optimizer = optimizer_run.split("-", 1)[0]
    return ["train", "--task", "mrpc", "--model", str(model), "--data-dir", str(glue), "--optimizer", optimizer,
            "--rank", "2", "--lr", "3e-3", "--epochs", "4", "--batch-size", "4", "--max-steps", "20",
            "--max-length", "32", "--max-eval-samples", "4", "--seed", "7", "--quiet", "--json",
            *TRAIN_RUNS[optimizer_run], "-o", str(output)]


def run_all(root: Path, model: Path, glue: Path) -> dict:
    """Run every golden stage under ``root``; {stage: {run: {file: sha256}}} plus the loss curves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(RECORDED_THREADS)
    try:
        return _run_stages(root, model, glue)
    finally:
        torch.set_num_threads(threads)


def _run_stages(root: Path, model: Path, glue: Path) -> dict:
    from cli_runner import run_cli
    from tiny_checkpoints import build_family

    results: dict = {"train": {}, "loss_curves": {}, "prune": {}, "merge": {}}
    for run in TRAIN_RUNS:
        output = root / "train" / run
        code, _, stderr = run_cli(*train_args(run, model, glue, output))
        assert code == 0, stderr
        results["train"][run] = file_hashes(output)
        results["loss_curves"][run] = json.loads((output / "umtam.json").read_text())["training"]["loss_curve"]
    for run, extra in PRUNE_RUNS.items():
        output = root / "prune" / run
        code, _, stderr = run_cli("prune", str(root / "train" / "umtam"), *extra, "-o", str(output), "--quiet")
        assert code == 0, stderr
        results["prune"][run] = file_hashes(output)
    family = build_family(root / "family")
    experts = [str(family.experts[task].path) for task in ("mrpc", "sst2", "mnli")]
    for run, extra in MERGE_RUNS.items():
        output = root / "merge" / run
        code, _, stderr = run_cli("merge", *experts, *extra, "-o", str(output), "--quiet")
        assert code == 0, stderr
        results["merge"][run] = file_hashes(output)
    return results


def main() -> None:
    import os
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    from conftest import build_tiny_model_dir
    from glue_fixtures import write_glue_dir

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_model_dir(root / "tiny-bert")
        glue = write_glue_dir(root / "data")
        results = run_all(root / "runs", model, glue)
        sidecars = {kind: normalized_sidecar(root / "runs" / run, root) for kind, run in SIDECARS.items()}
    if "--record" in sys.argv:
        # A new record is a change meant to change outputs: every other kind's bytes are of the old
        # outputs, and kept they would let a return to those outputs pass there. Each is recorded again.
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps({**results, "machines": {}}, indent=1, sort_keys=True) + "\n")
        for kind, sidecar in sidecars.items():
            golden_sidecar_path(kind).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        print(f"recorded {RECORD} and the sidecars of {', '.join(sidecars)}; other kinds of machine: record "
              "them again with --record-machine")
    elif "--record-machine" in sys.argv:  # this kind of CPU's bytes beside the others; the sidecars stay
        label = sys.argv[sys.argv.index("--record-machine") + 1]
        record = json.loads(RECORD.read_text())
        record.setdefault("machines", {})[label] = {stage: results[stage] for stage in OUTPUT_STAGES}
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"recorded this machine's outputs as {label!r} in {RECORD}")
    else:
        print(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
