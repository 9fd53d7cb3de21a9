"""Rank discovery: one DistEnv from whichever launcher started us.

Supported launchers and the variables read (first match wins):

- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, GROUP_WORLD_SIZE,
  MASTER_ADDR/PORT (recognised by TORCHELASTIC_RUN_ID).
- the deepspeed launcher (hostfile): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK,
  CROSS_SIZE, MASTER_ADDR/PORT (recognised by CROSS_RANK / LOCAL_SIZE).
- any other launcher exporting RANK/WORLD_SIZE ("env").
- mpirun (Open MPI): OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}; the rendezvous address
  comes from MASTER_ADDR/PORT, else (several hosts) from rank 0 through mpi4py (optional extra
  ``megadalle[mpi]``), else (one host) 127.0.0.1 and a port derived from the job id.
- srun (inside a job step): SLURM_PROCID, SLURM_STEP_NUM_TASKS / SLURM_NTASKS, SLURM_LOCALID,
  SLURM_NODEID, SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_NODELIST; the master is the step's first
  host and the port is derived from SLURM_JOB_ID unless MASTER_PORT is set. A batch script
  (SLURM_PROCID set but no SLURM_STEP_ID) is one process, not rank 0 of many.
- nothing: a single process.

Ranks must be numbered node by node (rank = node_rank * local_world_size + local_rank): the
paper's parameter sharding inside a machine and PowerSGD between machines both build their
groups from that. Every launcher above does so by default; an environment that breaks it (e.g.
``mpirun --map-by node``) or that contradicts itself (WORLD_SIZE not matching the SLURM task
count, a rank outside the world) raises LaunchError saying what to change.

`python -m megadalle launch hostfile --slots 8 < <(scontrol show hostnames)` writes
a deepspeed hostfile; `python -m megadalle launch env` prints what discover() sees.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from megadalle.config import ConfigError

DEFAULT_MASTER_PORT = 29500
# Ports derived from a job id fall in [_PORT_BASE, _PORT_BASE + _PORT_SPAN): above the usual
# service ports, below Linux's default ephemeral range (32768+), so they rarely collide.
_PORT_BASE, _PORT_SPAN = 20000, 12000


class LaunchError(ConfigError):
    """The launcher's environment is missing something or contradicts itself."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"
    # Added after the first five (keep that order: callers construct DistEnv positionally).
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// rendezvous (and deepspeed) read."""
        return {
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank), "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            # So that discover() after an export still names the launcher and the node layout.
            "NODE_RANK": str(self.node_rank), "NUM_NODES": str(self.num_nodes), "MEGADALLE_LAUNCHER": self.launcher,
        }

    def export(self, environ: dict[str, str] | None = None) -> None:
        """Write torch_env() into `environ` (default os.environ), so that srun and mpirun ranks
        can use env:// initialisation like torchrun ranks do."""
        (os.environ if environ is None else environ).update(self.torch_env())


# --------------------------------------------------------------------------------------------
# Reading variables
# --------------------------------------------------------------------------------------------


# Variables a launcher sets to describe a rank (torchrun/deepspeed, Open MPI, PMI, SLURM).
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "NODE_RANK", "CROSS_RANK", "CROSS_SIZE", "TORCHELASTIC_RUN_ID",
                 "MEGADALLE_LAUNCHER")
LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "PMIX_", "SLURM_")


def without_launcher_vars(env: Mapping[str, str]) -> dict[str, str]:
    """`env` minus every launcher variable: for a child that must run as its own single process
    (the demo's stages), whatever rank layout or live process group its parent has."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    v = env.get(key)
    if v is None or v.strip() == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise LaunchError(f"environment variable {key}={v!r} must be an integer; "
                          f"fix or unset it (it is read to find this process's rank)") from None


def _port(env: Mapping[str, str], key: str) -> int | None:
    p = _int(env, key)
    if p is not None and not 0 < p < 65536:
        raise LaunchError(f"{key}={p} is not a TCP port; use a number in 1..65535")
    return p


def port_from_job(job_id: str) -> int:
    """A port that every rank of one job derives alike, without talking to each other."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return _PORT_BASE + int.from_bytes(digest[:4], "big") % _PORT_SPAN


# --------------------------------------------------------------------------------------------
# SLURM host lists
# --------------------------------------------------------------------------------------------

_HOST_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"host list {text!r} has an unmatched ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise LaunchError(f"host list {text!r} has an unmatched '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(spec: str, whole: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise LaunchError(f"host list {whole!r}: bad range {item!r} (expected N or N-M)")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"host list {whole!r}: range {item!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0  # zero padding is kept: node[001-003]
        out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return out


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM host list ('gpu[001-003,007],login1', 'r[1-2]-n[01-02]') in order,
    as `scontrol show hostnames` does. Used where scontrol is not on PATH."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        m = re.search(r"\[([^\[\]]*)\]", item)
        if m is None:
            hosts.append(item)
            continue
        head, tail = item[:m.start()], item[m.end():]
        for mid in _expand_ranges(m.group(1), text):
            hosts += expand_hostlist(head + mid + tail)
    return hosts


def parse_hostnames(text: str) -> list[str]:
    """Host names from `scontrol show hostnames` output: one per line, validated."""
    hosts = [line.strip() for line in text.splitlines() if line.strip()]
    if not hosts:
        raise LaunchError("no host names given: run it as "
                          "`scontrol show hostnames \"$SLURM_JOB_NODELIST\" | ... hostfile`, inside a job")
    bad = [h for h in hosts if not _HOST_RE.match(h)]
    if bad:
        raise LaunchError(f"not host names: {bad[:3]}; expected the output of `scontrol show hostnames` "
                          f"(one name per line)")
    dups = sorted({h for h in hosts if hosts.count(h) > 1})
    if dups:
        raise LaunchError(f"host(s) {dups} listed twice; a deepspeed hostfile needs each node once")
    return hosts


def build_hostfile(hosts: Sequence[str], slots: int) -> str:
    """A deepspeed hostfile: one 'host slots=N' line per node."""
    if slots < 1:
        raise LaunchError(f"slots={slots}: give the number of GPUs per node (>= 1)")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def _tasks_on_node(spec: str, node_id: int, what: str) -> int:
    """SLURM_STEP_TASKS_PER_NODE-style '4(x2),3' -> tasks on node `node_id`."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"{what}={spec!r} is not a SLURM task count list like '8(x2),4'")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"SLURM_NODEID={node_id} but {what}={spec!r} lists {len(counts)} node(s)")
    return counts[node_id]


# --------------------------------------------------------------------------------------------
# Per-launcher discovery
# --------------------------------------------------------------------------------------------


def _from_torch_vars(env: Mapping[str, str]) -> DistEnv:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        missing = "WORLD_SIZE" if "RANK" in env else "RANK"
        raise LaunchError(f"{missing} is not set but {'RANK' if missing == 'WORLD_SIZE' else 'WORLD_SIZE'} is: "
                          f"a launcher sets both; unset the stray one or launch with torchrun/deepspeed")
    if "TORCHELASTIC_RUN_ID" in env:
        launcher, local_key, node_key, nodes_key = "torchrun", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher, local_key, node_key, nodes_key = "deepspeed", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"
    else:
        launcher, local_key, node_key, nodes_key = "env", "LOCAL_WORLD_SIZE", "NODE_RANK", "NUM_NODES"
        if env.get("MEGADALLE_LAUNCHER") in ("srun", "mpirun"):  # written by DistEnv.export()
            launcher = env["MEGADALLE_LAUNCHER"]
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_world = _int(env, local_key, _int(env, "LOCAL_WORLD_SIZE", world))
    local_rank = _int(env, "LOCAL_RANK", rank % local_world if local_world else 0)
    return DistEnv(rank, world, local_rank, local_world, launcher,
                   node_rank=_int(env, node_key, rank // local_world if local_world else 0),
                   num_nodes=_int(env, nodes_key, -(-world // local_world) if local_world else 1),
                   master_addr=env.get("MASTER_ADDR", ""), master_port=_port(env, "MASTER_PORT") or 0)


def _from_ompi(env: Mapping[str, str]) -> DistEnv:
    rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
    if world is None:
        raise LaunchError("OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not; "
                          "run under mpirun or unset the stray OMPI_* variables")
    local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", rank % local_world)
    return DistEnv(rank, world, local_rank, local_world, "mpirun",
                   node_rank=rank // local_world, num_nodes=-(-world // local_world),
                   master_addr=env.get("MASTER_ADDR", ""), master_port=_port(env, "MASTER_PORT") or 0)


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS"))
    if world is None:
        raise LaunchError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS is; "
                          "launch with srun --ntasks=N")
    node_id = _int(env, "SLURM_NODEID", 0)
    tasks_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tasks_spec:
        local_world = _tasks_on_node(tasks_spec, node_id,
                                     "SLURM_STEP_TASKS_PER_NODE" if "SLURM_STEP_TASKS_PER_NODE" in env
                                     else "SLURM_TASKS_PER_NODE")
    else:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", world)
    nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", -(-world // local_world)))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    master = env.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else "")
    port = _port(env, "MASTER_PORT") or (port_from_job(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else 0)
    return DistEnv(rank, world, _int(env, "SLURM_LOCALID", 0), local_world, "srun",
                   node_rank=node_id, num_nodes=nodes, master_addr=master, master_port=port)


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return "SLURM_PROCID" in env and step.isdigit()


# --------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------


def _check(d: DistEnv, env: Mapping[str, str], need_master: bool = True) -> None:
    src = {"torchrun": "RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE", "deepspeed": "RANK/WORLD_SIZE/LOCAL_SIZE",
           "env": "RANK/WORLD_SIZE/LOCAL_RANK", "mpirun": "OMPI_COMM_WORLD_*",
           "srun": "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID"}[d.launcher]

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise LaunchError(f"{d.launcher} environment ({src}): {msg}")

    # The launcher's view against SLURM's first (inside a job step): it names the real cause.
    if _in_slurm_step(env) and d.launcher in ("env", "mpirun", "srun"):  # not per-node agents
        slurm_world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS"))
        if slurm_world is not None and slurm_world != d.world_size:
            raise LaunchError(
                f"WORLD_SIZE={d.world_size} (from {src}) but SLURM runs {slurm_world} task(s) in this step "
                f"(SLURM_STEP_NUM_TASKS/SLURM_NTASKS): the exported variables are stale or were set by hand; "
                f"unset RANK/WORLD_SIZE/LOCAL_RANK so that megadalle reads SLURM's own, or run srun --ntasks="
                f"{d.world_size}")
        slurm_rank = _int(env, "SLURM_PROCID")
        if d.launcher in ("env", "srun") and slurm_rank != d.rank:
            raise LaunchError(f"RANK={d.rank} but SLURM_PROCID={slurm_rank}: every srun task got the same "
                              f"exported RANK; unset RANK/WORLD_SIZE/LOCAL_RANK before srun")
    need(d.world_size >= 1, f"world size {d.world_size} must be >= 1")
    need(0 <= d.rank < d.world_size, f"rank {d.rank} is outside the world of {d.world_size} processes")
    need(1 <= d.local_world_size <= d.world_size,
         f"{d.local_world_size} processes per node does not fit a world of {d.world_size}")
    need(0 <= d.local_rank < d.local_world_size,
         f"local rank {d.local_rank} is outside the {d.local_world_size} processes of this node")
    need(0 <= d.node_rank < d.num_nodes, f"node rank {d.node_rank} is outside the {d.num_nodes} node(s)")
    if d.world_size % d.local_world_size == 0:
        need(d.num_nodes * d.local_world_size == d.world_size,
             f"{d.num_nodes} node(s) x {d.local_world_size} processes per node != world size {d.world_size}")
        need(d.rank == d.node_rank * d.local_world_size + d.local_rank,
             f"rank {d.rank} is not node {d.node_rank} x {d.local_world_size} + local rank {d.local_rank}: ranks "
             f"must be numbered node by node (mpirun: --map-by slot; srun: --distribution=block)")
    if d.world_size > 1 and need_master:
        need(bool(d.master_addr) and d.master_port > 0,
             "no rendezvous address: set MASTER_ADDR and MASTER_PORT (the first node's host name and a free port)")

    job_nodes = _int(env, "SLURM_JOB_NUM_NODES", _int(env, "SLURM_NNODES"))
    if job_nodes is not None and "SLURM_JOB_ID" in env and d.num_nodes > job_nodes:
        raise LaunchError(f"{d.launcher} claims {d.num_nodes} node(s) but the SLURM job holds {job_nodes} "
                          f"(SLURM_JOB_NUM_NODES); ask sbatch for --nodes={d.num_nodes} or launch on fewer")


def discover(env: dict[str, str] | None = None) -> DistEnv:
    """Rank, world, node and rendezvous of this process from the launcher's variables.

    Pure: reads `env` (default os.environ) only, never talks to other ranks, so any rank may call
    it at any time. Under mpirun across hosts without MASTER_ADDR, master_addr is left empty and
    `rendezvous()` fills it (collectively) before the process group starts.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env or "WORLD_SIZE" in env:
        d = _from_torch_vars(env)
    elif "OMPI_COMM_WORLD_RANK" in env:
        d = _from_ompi(env)
    elif _in_slurm_step(env):
        d = _from_slurm(env)
    else:
        return DistEnv()
    if d.world_size == 1:
        d = replace(d, master_addr=d.master_addr or "127.0.0.1", master_port=d.master_port or DEFAULT_MASTER_PORT)
    elif not d.master_addr and d.num_nodes == 1:
        # One host: loopback is right, and the port must be equal on every rank without talking.
        job = env.get("SLURM_JOB_ID") or env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid") or ""
        d = replace(d, master_addr="127.0.0.1",
                    master_port=d.master_port or (port_from_job(job) if job else DEFAULT_MASTER_PORT))
    elif not d.master_port and d.master_addr:
        d = replace(d, master_port=DEFAULT_MASTER_PORT)
    # mpirun across hosts: rendezvous() asks rank 0 through mpi4py, collectively, later.
    _check(d, env, need_master=not (d.launcher == "mpirun" and not d.master_addr))
    return d


def rendezvous(d: DistEnv | None = None) -> DistEnv:
    """discover() plus, under mpirun across hosts, rank 0's address and a free port sent to
    every rank through mpi4py. Collective under mpirun: call it on every rank. Exports the
    result (DistEnv.export) so that env:// initialisation works for every launcher."""
    d = discover() if d is None else d
    if d.is_distributed and not d.master_addr:
        try:
            from mpi4py import MPI  # optional extra: megadalle[mpi]
        except ImportError:
            raise LaunchError("mpirun across several hosts needs a rendezvous address: install mpi4py "
                              "(pip install 'megadalle[mpi]') or pass -x MASTER_ADDR=<first host> "
                              "-x MASTER_PORT=<free port> to mpirun") from None
        comm = MPI.COMM_WORLD
        addr_port = None
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                addr_port = (socket.gethostname(), s.getsockname()[1])
        addr, port = comm.bcast(addr_port, root=0)
        d = replace(d, master_addr=addr, master_port=port)
    d.export()
    return d


def init_process_group(backend: str = "auto", timeout_s: float = 600, d: DistEnv | None = None) -> DistEnv:
    """rendezvous() then torch.distributed's env:// initialisation, with `timeout_s` as the
    collective timeout (distributed.timeout_s). backend "auto": nccl with CUDA, else gloo.
    A no-op beyond discovery for a single process or when a group is already up."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    d = rendezvous(d)
    if not d.is_distributed or dist.is_initialized():
        return d
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    dist.init_process_group(backend, init_method="env://", rank=d.rank, world_size=d.world_size,
                            timeout=timedelta(seconds=timeout_s))
    return d



