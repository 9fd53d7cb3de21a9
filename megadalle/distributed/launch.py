"""Rank discovery: one DistEnv from whichever launcher started us.

Supported: the deepspeed launcher and torchrun (RANK/WORLD_SIZE/LOCAL_RANK...), srun
(SLURM_PROCID/SLURM_NTASKS/...), mpirun (OMPI_COMM_WORLD_*), or nothing (a single process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: dict[str, str], key: str) -> int | None:
    v = env.get(key)
    return None if v is None or v == "" else int(v)


def discover(env: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE") or 1
        local_world = _int(env, "LOCAL_WORLD_SIZE") or world
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        return DistEnv(_int(env, "RANK") or 0, world, _int(env, "LOCAL_RANK") or 0, local_world, launcher)
    if "OMPI_COMM_WORLD_RANK" in env:
        return DistEnv(_int(env, "OMPI_COMM_WORLD_RANK") or 0, _int(env, "OMPI_COMM_WORLD_SIZE") or 1,
                       _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0, _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") or 1,
                       "mpirun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS") or 1
        return DistEnv(_int(env, "SLURM_PROCID") or 0, world, _int(env, "SLURM_LOCALID") or 0,
                       _int(env, "SLURM_NTASKS_PER_NODE") or world, "srun")
    return DistEnv()
