"""Data-parallel training under `torchrun` or `accelerate launch`, on torch's DistributedDataParallel.

The launchers start one process per rank and describe it in the environment:
torchrun (and accelerate on GPUs, which goes through it) sets RANK, WORLD_SIZE
and LOCAL_RANK; accelerate's multi-CPU mode starts ranks with `mpirun`, whose
MPI sets PMI_* (MPICH, Intel MPI), OMPI_COMM_WORLD_* (Open MPI) or MV2_*
(MVAPICH) instead. Both set MASTER_ADDR and MASTER_PORT. That environment is all
umtam reads, in the same order accelerate does. The process group uses gloo on
CPU and nccl on CUDA.

Every optimizer step consumes one *global* batch of ``--batch-size`` examples,
the same batch a single process would take (batch order is a pure function of
seed and epoch, so every rank computes it), split into contiguous shards across
ranks. DDP averages the gradients over ranks during backward; each rank's loss
is scaled by world_size * shard / batch, so the average is the gradient of the
global batch's mean loss even when the last batch does not split evenly. The
curvature tracker and the optimizer then read identical all-reduced gradients
on every rank, so every rank holds the same statistics and optimizer state, and
rank 0 alone evaluates and writes the checkpoint.

Not supported yet: sharded optimizer state or weights (FSDP, ZeRO). UMTAM's
state is already about 1-2% of AdamW's, and the models this tool targets fit on
one device, so replicating the state costs little; sharding would need the
tracker's row and column statistics to be gathered before saving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from umtam.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in the job; world_size 1 means a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> tuple[list[int], float]:
        """This rank's contiguous slice of a global batch, and the factor its mean loss is scaled by.

        A rank whose slice would be empty (a last batch smaller than the world)
        gets the batch's first example with factor 0: DDP needs every rank to
        run backward, and a zero-weighted loss adds nothing to the gradient.
        """
        total = len(indices)
        if not self.enabled:
            return list(indices), 1.0
        start, stop = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
        if stop == start:
            return [indices[0]], 0.0
        return list(indices[start:stop]), self.world_size * (stop - start) / total


# the first variable set wins: torchrun's, then MPICH / Intel MPI, Open MPI, MVAPICH (as accelerate reads them)
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(environ, names: Sequence[str], default: int) -> int:
    for name in names:
        if environ.get(name, "") != "":
            try:
                return int(environ[name])
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {environ[name]!r}") from None
    return default


def from_environment(environ=os.environ) -> Distributed:
    """The rank layout torchrun / accelerate launch / mpirun exported, or a single process."""
    world_size = _first_int(environ, WORLD_SIZE_VARIABLES, 1)
    rank = _first_int(environ, RANK_VARIABLES, 0)
    local_rank = _first_int(environ, LOCAL_RANK_VARIABLES, rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size})")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank)


def setup(context: Distributed, device_type: str) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) unless single-process or already joined."""
    import torch.distributed as dist

    if context.enabled and not dist.is_initialized():
        # rank and size passed explicitly: under mpirun they are not in RANK / WORLD_SIZE
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method="env://",
                                rank=context.rank, world_size=context.world_size)


def teardown(context: Distributed) -> None:
    import torch.distributed as dist

    if context.enabled and dist.is_initialized():
        dist.barrier()  # rank 0 has written the checkpoint before anyone leaves
        dist.destroy_process_group()


def wrap(model, context: Distributed):
    """The model to run forward/backward through: DDP when distributed, the model itself otherwise."""
    if not context.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def global_mean(value, context: Distributed) -> float:
    """The global batch's mean loss from each rank's scaled loss (what a single process would log)."""
    if not context.enabled:
        return float(value.detach())
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return float(total) / context.world_size
