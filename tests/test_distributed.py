"""Data-parallel training: sharding arithmetic, the launcher environment, and 2 gloo processes
against one process with the same global batch."""

from __future__ import annotations

import pytest

from umtam.distributed import Distributed, from_environment
from umtam.errors import ConfigError


@pytest.mark.parametrize(
    "size, world, expected",
    [
        (8, 2, [([0, 1, 2, 3], 1.0), ([4, 5, 6, 7], 1.0)]),
        (5, 2, [([0, 1], 0.8), ([2, 3, 4], 1.2)]),
        (1, 2, [([0], 0.0), ([0], 2.0)]),  # rank 0 runs a zero-weighted copy so DDP's backward still meets
        (7, 3, [([0, 1], 6 / 7), ([2, 3], 6 / 7), ([4, 5, 6], 9 / 7)]),
    ],
)
def test_shards_cover_the_batch_and_weights_restore_its_mean(size, world, expected):
    indices = list(range(size))
    shards = [Distributed(rank=r, world_size=world).shard(indices) for r in range(world)]
    assert [(s, pytest.approx(f)) for s, f in shards] == expected
    # DDP averages the ranks' gradients of factor_r * (mean over shard r), so each example
    # weighs factor_r / (world * n_r): exactly 1 / size, the weight of the global batch mean
    assert all(f / (world * len(s)) == pytest.approx(1 / size) for s, f in shards if f > 0)
    covered = [i for s, f in shards if f > 0 for i in s]
    assert covered == indices


def test_single_process_shard_is_the_batch():
    assert Distributed().shard([3, 1, 2]) == ([3, 1, 2], 1.0)
    assert not Distributed().enabled and Distributed().is_main


def test_environment_of_a_launcher():
    context = from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert context == Distributed(rank=1, world_size=2, local_rank=1)
    assert context.enabled and not context.is_main
    assert from_environment({}) == Distributed()


@pytest.mark.parametrize("environ, expected", [
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, Distributed(rank=1, world_size=2, local_rank=1)),  # mpirun (MPICH)
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     Distributed(rank=3, world_size=4, local_rank=1)),  # Open MPI
    ({"RANK": "0", "WORLD_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "2"}, Distributed(rank=0, world_size=2)),
])
def test_mpi_launchers_are_read_as_accelerate_reads_them(environ, expected):
    assert from_environment(environ) == expected


@pytest.mark.parametrize("environ", [{"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}])
def test_a_broken_environment_is_a_config_error(environ):
    with pytest.raises(ConfigError):
        from_environment(environ)


def _train_args(tiny_model_dir, glue_dir, out, optimizer):
    return ["train", "--task", "mrpc", "--model", str(tiny_model_dir), "--data-dir", str(glue_dir),
            "--optimizer", optimizer, "--rank", "2", "--lr", "1e-3", "--max-steps", "6",
            # 7 does not split evenly over 2 ranks (3 + 4), and the epoch's last batch is smaller still
            "--batch-size", "7", "--max-length", "32", "--seed", "7", "-o", str(out), "--json", "--quiet"]


def _run(command, tmp_path):
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# Weight tolerance per optimizer. The two runs do the same math with the gradients summed in
# another order (float noise ~1e-7). AdamW passes that noise through almost unchanged; UMTAM's
# rank-r factors come from an SVD of a 2r x 2r core whose singular vectors turn by more when
# singular values are close (the tiny model at r=2), so the same noise moves weights by ~1e-4.
WEIGHT_ATOL = {"adamw": 1e-6, "umtam": 1e-3}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["umtam", "adamw"])
def test_two_gloo_ranks_equal_one_process_with_the_same_global_batch(optimizer, tmp_path, tiny_model_dir,
                                                                     glue_dir):
    import json
    import sys

    import torch
    from safetensors.torch import load_file

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "umtam_cli", *_train_args(tiny_model_dir, glue_dir, single, optimizer)], tmp_path)
    stdout = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "umtam_cli", *_train_args(tiny_model_dir, glue_dir, ddp, optimizer)], tmp_path)
    assert json.loads(stdout)["steps"] == 6  # one JSON document: rank 0 alone reports
    weights, theirs = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert weights.keys() == theirs.keys()
    for key in weights:
        torch.testing.assert_close(theirs[key], weights[key], rtol=1e-4, atol=WEIGHT_ATOL[optimizer])
    # the statistics come straight from the all-reduced gradients: float noise only, for every optimizer
    stats, their_stats = load_file(single / "stats.safetensors"), load_file(ddp / "stats.safetensors")
    assert stats.keys() == their_stats.keys()
    for key in stats:
        torch.testing.assert_close(their_stats[key], stats[key], rtol=1e-4, atol=1e-6)
    curves = [json.loads((d / "umtam.json").read_text())["training"]["loss_curve"] for d in (single, ddp)]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


@pytest.mark.slow  # where accelerate and mpirun exist: two launches, as long as the gloo case's
def test_accelerate_launch_through_mpirun_on_cpu(tmp_path, tiny_model_dir, glue_dir):
    """accelerate's multi-CPU mode starts ranks with mpirun (MPI variables, not torchrun's).

    Needs `accelerate` and an MPI (`pip install accelerate mpich`); neither is a
    dependency, so this skips where they are missing.
    """
    import json
    import shutil
    import sys
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    pytest.importorskip("accelerate")
    accelerate = Path(sys.executable).parent / "accelerate"
    if not (accelerate.exists() and shutil.which("mpirun")):
        pytest.skip("accelerate's CLI or mpirun is not installed")
    (tmp_path / "hosts").write_text("localhost\n")
    single, launched = tmp_path / "single", tmp_path / "accelerate"
    _run([sys.executable, "-m", "umtam_cli", *_train_args(tiny_model_dir, glue_dir, single, "adamw")], tmp_path)
    _run([str(accelerate), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
          "no", "--dynamo_backend", "no", "--mpirun_hostfile", str(tmp_path / "hosts"), "-m", "umtam_cli",
          *_train_args(tiny_model_dir, glue_dir, launched, "adamw")], tmp_path)
    assert json.loads((launched / "umtam.json").read_text())["steps"] == 6
    ours, theirs = load_file(single / "model.safetensors"), load_file(launched / "model.safetensors")
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)  # two ranks really ran: float noise shows
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-4, atol=WEIGHT_ATOL["adamw"])
