"""The 2-D ("pp", "dp") device mesh of a pipeline x data parallel run.

Rank layout (torchtitan's, pp outermost): global rank ``r`` is pipeline stage-rank ``r // dp`` of
data-parallel replica ``r % dp``. The ranks of one pipeline (fixed dp index) form the ``pp`` process
group; the ranks holding the same stage in different replicas form the ``dp`` group. Every rank of one
pipeline must get the same micro-batches: the data sampler shards by :attr:`ParallelDims.dp_rank`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from omnibal_pl.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the two parallel dimensions and this rank's coordinates in them.

    Invariants: ``pp * dp == world_size``; ``0 <= pp_rank < pp``; ``0 <= dp_rank < dp``.
    """

    pp: int
    dp: int
    pp_rank: int
    dp_rank: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp


def check_sizes(pp: int, dp: int, world_size: int) -> None:
    """Raise :class:`ConfigError` unless ``pp`` and ``dp`` are >= 1 and ``pp * dp == world_size``."""
    if pp < 1 or dp < 1:
        raise ConfigError(f"parallel sizes: pp={pp} and dp={dp} must both be >= 1")
    if pp * dp != world_size:
        raise ConfigError(
            f"parallel sizes: pp={pp} x dp={dp} = {pp * dp} processes, but the world has {world_size}; "
            f"launch pp x dp processes or set dp={world_size // pp if world_size % pp == 0 else '?'} "
            f"(dp must divide the world size by pp)"
        )


def build_mesh(pp: int, dp: int | None = None, device_type: str = "cpu") -> tuple[DeviceMesh, ParallelDims]:
    """The ("pp", "dp") mesh over the initialised default process group, and this rank's dims.

    ``dp=None`` takes ``world_size // pp``. ``device_type`` is ``"cpu"`` (gloo) or ``"cuda"`` (NCCL).
    """
    if not dist.is_initialized():
        raise ConfigError("build_mesh: torch.distributed is not initialised; call init_process_group first")
    world = dist.get_world_size()
    if dp is None:
        if pp < 1 or world % pp:
            raise ConfigError(f"parallel sizes: pp={pp} does not divide the world size {world}")
        dp = world // pp
    check_sizes(pp, dp, world)
    mesh = init_device_mesh(device_type, (pp, dp), mesh_dim_names=("pp", "dp"))
    dims = ParallelDims(pp=pp, dp=dp, pp_rank=mesh["pp"].get_local_rank(), dp_rank=mesh["dp"].get_local_rank())
    return mesh, dims
