"""SIGKILL during a write leaves the old output or nothing, never a half-written checkpoint.

Each case runs the real CLI in a subprocess that kills itself with SIGKILL at
a named point of the atomic write (``KILLER`` below: the hook lives here, in
the test, and wraps calls every write makes: safetensors' ``save_file`` (or
umtam's streaming ``WeightsWriter.close``),
``os.fsync`` and ``os.rename``), in the directory whose name starts with the
given prefix:

    payload  right after the first tensor file lands in the staging directory
    sealed   the staging directory is complete and its sidecar (the first file
             fsynced) is on disk; nothing is renamed yet
    exchanged  the atomic swap (Linux renameat2 RENAME_EXCHANGE) put the new output
             in place; the old one, now at the staging name, is not yet removed
    swap     where the swap cannot be atomic (forced here: renameat2 reported
             unsupported), the old output was moved aside and the new one is not
             yet in place
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from tiny_checkpoints import build_family
from umtam import resume
from umtam.checkpoint import Checkpoint, load_checkpoint
from umtam.errors import CheckpointError
from umtam.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]

KILLER = r"""
import os, signal, sys
from pathlib import Path

point, _, prefix = os.environ["UMTAM_TEST_KILL_AT"].partition(":")

def die_if(path):
    if Path(path).name.startswith(prefix):
        os.kill(os.getpid(), signal.SIGKILL)

if point == "payload":
    import safetensors.torch
    import umtam.shards
    save_file = safetensors.torch.save_file
    def saving(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        die_if(Path(filename).parent)
    safetensors.torch.save_file = saving
    close = umtam.shards.WeightsWriter.close  # a merge streams its weights through it
    def closing(self):
        names = close(self)
        die_if(self.directory)
        return names
    umtam.shards.WeightsWriter.close = closing
elif point == "sealed":
    fsync = os.fsync
    def syncing(fd):
        fsync(fd)
        die_if(Path(os.readlink(f"/proc/self/fd/{fd}")).parent)
    os.fsync = syncing
elif point == "exchanged":
    import umtam.atomic
    exchange = umtam.atomic._exchange
    def exchanging(first, second):
        swapped = exchange(first, second)
        if swapped:
            die_if(first)  # the staging name, which now holds the old output
        return swapped
    umtam.atomic._exchange = exchanging
elif point == "swap":
    import umtam.atomic
    umtam.atomic._exchange = lambda first, second: False  # as on a kernel or file system without it
    rename = os.rename
    def renaming(src, dst, *args, **kwargs):
        rename(src, dst, *args, **kwargs)
        die_if(dst)
    os.rename = renaming

from umtam_cli.main import main
main(sys.argv[1:])
"""

@dataclass
class Killed:
    out: Path
    before: dict[str, bytes] | None  # the bytes of the output that was there, if any
    at_out: str = "old"  # what the kill left at out: "old" (or nothing), "new", or "aside" (the old at .old-)


def run_killed_at(point: str, prefix: str, *args: str) -> None:
    """Run ``umtam ARGS`` until it SIGKILLs itself at ``point`` in the directory named ``prefix*``."""
    env = {**os.environ, "UMTAM_TEST_KILL_AT": f"{point}:{prefix}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", KILLER, *args, "--quiet"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    # a write that never reached the kill point finished: the case would test nothing
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def loads(path: Path) -> bool:
    try:
        load_checkpoint(path)
    except CheckpointError:
        return False
    return True


def leftovers(out: Path) -> list[Path]:
    """What a killed write left beside ``out``: hidden, and named after it."""
    return sorted(path for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("crash-family"), {"mrpc": 2, "sst2": 2})


def existing_output(family, out: Path) -> dict[str, bytes]:
    """Put a finished checkpoint at ``out`` (what --force replaces) and return its bytes."""
    shutil.copytree(family.experts["sst2"].path, out)
    return snapshot(out)


# ----------------------------------------------------------------------------- cases


@pytest.fixture(scope="module")
def train_killed_in_payload(tmp_path_factory, tiny_model_dir, glue_dir, family):
    out = tmp_path_factory.mktemp("train-payload") / "out"
    before = existing_output(family, out)
    run_killed_at("payload", ".out.tmp-", "train", "--task", "mrpc", "--model", str(tiny_model_dir),
                  "--data-dir", str(glue_dir), "--max-steps", "2", "--batch-size", "8",
                  "--max-length", "32", "-o", str(out), "--force")
    return Killed(out, before)


def prune_killed(tmp_path_factory, family, point: str, prefix: str) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path_factory.mktemp(f"prune-{point}") / "out"
    before = existing_output(family, out)
    run_killed_at(point, prefix, "prune", str(family.experts["mrpc"].path), "--keep", "0.5", "-o", str(out),
                  "--force")
    return out, before


@pytest.fixture(scope="module")
def prune_killed_when_exchanged(tmp_path_factory, family):
    return Killed(*prune_killed(tmp_path_factory, family, "exchanged", ".out.tmp-"), at_out="new")


@pytest.fixture(scope="module")
def prune_killed_in_swap(tmp_path_factory, family):
    return Killed(*prune_killed(tmp_path_factory, family, "swap", ".out.old-"), at_out="aside")


@pytest.fixture(scope="module")
def merge_killed_in_payload(tmp_path_factory, family):
    out = tmp_path_factory.mktemp("merge-payload") / "out"
    run_killed_at("payload", ".out.tmp-", "merge", *expert_paths(family), "-o", str(out))
    return Killed(out, None)


@pytest.fixture(scope="module")
def merge_killed_when_sealed(tmp_path_factory, family):
    out = tmp_path_factory.mktemp("merge-sealed") / "out"
    before = existing_output(family, out)
    run_killed_at("sealed", ".out.tmp-", "merge", *expert_paths(family), "-o", str(out), "--force")
    return Killed(out, before)


def expert_paths(family) -> list[str]:
    return [str(expert.path) for expert in family.experts.values()]


# Killing a training run costs a whole subprocess training (~7 s on 2 cores) before its three tests run.
CASES = [pytest.param("train_killed_in_payload", marks=pytest.mark.slow), "prune_killed_when_exchanged",
         "prune_killed_in_swap", "merge_killed_in_payload", "merge_killed_when_sealed"]


@pytest.fixture(params=CASES)
def case(request) -> Killed:
    return request.getfixturevalue(request.param)


def test_the_output_is_the_old_one_or_the_new_one_whole(case):
    if case.at_out == "new":  # killed after the atomic swap: the new output is in place, whole
        assert loads(case.out) and snapshot(case.out) != case.before
    elif case.at_out == "aside":  # killed between the two renames of a non-atomic replace
        (retired,) = [path for path in leftovers(case.out) if ".old-" in path.name]  # beside the new, staged
        assert not case.out.exists() and snapshot(retired) == case.before
    elif case.before is None:
        assert not case.out.exists()
    else:
        assert snapshot(case.out) == case.before and loads(case.out)


def test_leftovers_are_hidden_and_named_temporary(case):
    found = leftovers(case.out)
    assert found and all(".tmp-" in path.name or ".old-" in path.name for path in found)
    assert [path for path in case.out.parent.iterdir() if path != case.out and path not in found] == []


def test_leftovers_never_load_as_checkpoints(case):
    assert [path.name for path in leftovers(case.out) if loads(path)] == []


def test_the_next_write_removes_dead_leftovers(merge_killed_in_payload, family):
    out = merge_killed_in_payload.out
    code, _, stderr = run_cli("merge", *expert_paths(family), "-o", str(out), "--quiet")
    assert code == 0, stderr
    assert loads(out) and leftovers(out) == []


def test_the_next_write_removes_the_old_output_an_exchange_left(prune_killed_when_exchanged, family):
    out = prune_killed_when_exchanged.out
    (old,) = leftovers(out)
    assert snapshot(old) == prune_killed_when_exchanged.before  # what the kill interrupted the removal of
    code, _, stderr = run_cli("prune", str(family.experts["mrpc"].path), "--keep", "0.5", "-o", str(out),
                              "--force", "--quiet")
    assert code == 0, stderr
    assert loads(out) and leftovers(out) == []


# ----------------------------------------------------------------------------- periodic training states


@pytest.mark.slow
def test_a_kill_while_writing_a_state_resumes_from_the_previous_one(tmp_path, tiny_model_dir, glue_dir):
    out, state_dir = tmp_path / "run", tmp_path / "run-state"
    options = ["--task", "mrpc", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--max-steps", "6",
               "--batch-size", "8", "--max-length", "32", "--seed", "7", "--lr", "1e-3"]
    run_killed_at("sealed", ".step-00000004.tmp-", "train", *options, "--save-every", "2", "-o", str(out))
    assert not out.exists()
    assert [path.name for path in resume.complete_states(state_dir)] == ["step-00000002"]
    leftover, = [path for path in state_dir.iterdir() if path.name.startswith(".step-00000004.tmp-")]
    assert not loads(leftover)

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process ran: same kernels, same bits
    try:
        code, _, stderr = run_cli("train", "--resume", str(state_dir), "--quiet")
        assert code == 0, stderr
        reference = train(TrainConfig(task="mrpc", output=str(tmp_path / "reference"), model=str(tiny_model_dir),
                                      data_dir=str(glue_dir), max_steps=6, batch_size=8, max_length=32, seed=7,
                                      lr=1e-3))
    finally:
        torch.set_num_threads(before)
    assert not leftover.exists()  # the resumed run cleaned its state directory
    resumed = load_checkpoint(out)
    assert resumed.sidecar.as_json()["training"]["resumed"][0]["step"] == 2
    a, b = Checkpoint.load_tensors(reference), resumed.load_tensors()
    assert all(torch.equal(a[key], b[key]) for key in a)
