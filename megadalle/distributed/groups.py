"""Two-level process groups: ranks of one machine (intra) and ranks with the same local index on
every machine (inter).

The paper's exchange (Ramesh et al. 2021, section 2.5 and appendix E) reduces gradients uncompressed
inside a machine (fast NVLink) and compresses only what crosses machines (slow network). That
needs two kinds of groups:

    world rank = machine * L + local            (L = gpus_per_node, M = machines)
    intra[m]   = ranks {m*L, ..., m*L + L - 1}  (one per machine, size L)
    inter[l]   = ranks {l, L + l, ..., (M-1)*L + l}   (one per local index, size M)

Launchers number ranks machine by machine (deepspeed, torchrun, srun's block distribution, mpirun
--map-by slot), so `rank // L` is the machine; a cyclic numbering is refused. `distributed.gpus_per_node` overrides L
to pretend several machines on one host: 4 processes with gpus_per_node=2 are 2 machines x 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megadalle.config import ConfigError
from megadalle.distributed.launch import DistEnv, discover


@dataclass
class TwoLevelGroups:
    rank: int
    world_size: int
    gpus_per_node: int  # L: ranks per (possibly simulated) machine
    intra: Any  # torch.distributed ProcessGroup of this rank's machine (size L)
    inter: Any  # ProcessGroup of the ranks sharing this rank's local index (size M)

    @property
    def machines(self) -> int:  # M
        return self.world_size // self.gpus_per_node

    @property
    def machine(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local_index(self) -> int:
        return self.rank % self.gpus_per_node

    def intra_ranks(self, machine: int | None = None) -> list[int]:
        m = self.machine if machine is None else machine
        return list(range(m * self.gpus_per_node, (m + 1) * self.gpus_per_node))

    def inter_ranks(self, local_index: int | None = None) -> list[int]:
        loc = self.local_index if local_index is None else local_index
        return list(range(loc, self.world_size, self.gpus_per_node))


def resolve_gpus_per_node(world_size: int, gpus_per_node: int = 0, env: DistEnv | None = None) -> int:
    """L from the config (when > 0, a simulation of several machines) or from the launcher."""
    env = env or discover()
    per_node = gpus_per_node or env.local_world_size or world_size
    if per_node < 1 or world_size % per_node != 0:
        source = "distributed.gpus_per_node" if gpus_per_node else "the launcher's local world size"
        raise ConfigError(
            f"{source}={per_node} does not divide the world size {world_size}; set "
            f"--distributed.gpus_per_node to a divisor of {world_size} (ranks per machine)")
    if not gpus_per_node and env.is_distributed and env.local_rank != env.rank % per_node:
        # Ranks are not numbered machine by machine (e.g. mpirun --map-by node): rank // L would
        # put ranks of different machines into one "intra" group and the exchange would send
        # uncompressed gradients over the network.
        raise ConfigError(
            f"rank {env.rank} has local rank {env.local_rank}, expected {env.rank % per_node}: ranks must be "
            f"numbered machine by machine (block distribution); launch with --map-by slot / srun "
            f"--distribution=block, or set --distributed.gpus_per_node explicitly")
    return per_node


def build_groups(gpus_per_node: int = 0, env: DistEnv | None = None) -> TwoLevelGroups:
    """Create the intra- and inter-machine groups. Collective: every rank must call it, in the same
    order relative to other `new_group` calls (torch.distributed requires that)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_groups needs torch.distributed to be initialised first")
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = resolve_gpus_per_node(world, gpus_per_node, env)
    machines = world // per_node
    intra = inter = None
    # Every rank creates every group (new_group is collective over the whole world), keeping its own.
    for m in range(machines):
        g = dist.new_group(list(range(m * per_node, (m + 1) * per_node)))
        if m == rank // per_node:
            intra = g
    for loc in range(per_node):
        g = dist.new_group(list(range(loc, world, per_node)))
        if loc == rank % per_node:
            inter = g
    return TwoLevelGroups(rank=rank, world_size=world, gpus_per_node=per_node, intra=intra, inter=inter)
