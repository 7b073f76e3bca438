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


@pytest.mark.parametrize("environ", [{"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}])
def test_a_broken_environment_is_a_config_error(environ):
    with pytest.raises(ConfigError):
        from_environment(environ)
