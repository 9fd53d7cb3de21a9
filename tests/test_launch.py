"""Rank discovery from synthetic launcher environments (the variables each launcher really sets),
host lists and hostfiles. Real launches live in test_mpirun.py."""

import subprocess
import sys

import pytest

from megadalle.config import ConfigError
from megadalle.distributed.launch import (DistEnv, LaunchError, build_hostfile, discover, expand_hostlist,
                                          parse_hostnames, port_from_job, rendezvous)


def torchrun_env(rank, local_rank, group_rank, nproc=4, nnodes=2, **extra):
    # As torch.distributed.elastic's local agent sets them for each worker.
    env = {"RANK": rank, "WORLD_SIZE": nproc * nnodes, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": nproc,
           "GROUP_RANK": group_rank, "GROUP_WORLD_SIZE": nnodes, "ROLE_RANK": rank,
           "MASTER_ADDR": "node-a", "MASTER_PORT": 29400, "TORCHELASTIC_RUN_ID": "job7",
           "TORCHELASTIC_RESTART_COUNT": 0, **extra}
    return {k: str(v) for k, v in env.items()}


def deepspeed_env(rank, local_rank, node, slots=8, nodes=2, **extra):
    # As deepspeed/launcher/launch.py sets them (LOCAL_SIZE, CROSS_RANK, CROSS_SIZE).
    env = {"RANK": rank, "WORLD_SIZE": slots * nodes, "LOCAL_RANK": local_rank, "LOCAL_SIZE": slots,
           "CROSS_RANK": node, "CROSS_SIZE": nodes, "MASTER_ADDR": "gpu001", "MASTER_PORT": 29500, **extra}
    return {k: str(v) for k, v in env.items()}


def srun_env(procid, localid, nodeid, ntasks=16, nodes=2, tasks_per_node="8(x2)", **extra):
    # A task of `srun --nodes=2 --ntasks-per-node=8` inside job 4242 on gpu[001-002].
    env = {"SLURM_JOB_ID": 4242, "SLURM_STEP_ID": 0, "SLURM_PROCID": procid, "SLURM_LOCALID": localid,
           "SLURM_NODEID": nodeid, "SLURM_NTASKS": ntasks, "SLURM_STEP_NUM_TASKS": ntasks,
           "SLURM_STEP_NUM_NODES": nodes, "SLURM_JOB_NUM_NODES": nodes, "SLURM_NNODES": nodes,
           "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_TASKS_PER_NODE": tasks_per_node,
           "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_JOB_NODELIST": "gpu[001-002]", **extra}
    return {k: str(v) for k, v in env.items()}


def ompi_env(rank, size=4, local_size=2, **extra):
    env = {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": size,
           "OMPI_COMM_WORLD_LOCAL_RANK": rank % local_size, "OMPI_COMM_WORLD_LOCAL_SIZE": local_size,
           "PMIX_NAMESPACE": "prterun-host-1234@1", **extra}
    return {k: str(v) for k, v in env.items()}


def test_no_launcher_is_a_single_process():
    assert discover({}) == DistEnv()
    # A batch script has SLURM_PROCID=0 and SLURM_NTASKS=16 but is one process, not rank 0 of 16.
    d = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "9", "SLURM_JOB_NUM_NODES": "2"})
    assert d.world_size == 1 and d.launcher == "none"


def test_every_launcher_maps_the_same_process_to_the_same_distenv():
    # Global rank 5 = node 1, local rank 1 of a 2 x 4 world, whoever launched it.
    expect = dict(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, num_nodes=2)
    envs = {
        "torchrun": torchrun_env(5, 1, 1),
        "deepspeed": deepspeed_env(5, 1, 1, slots=4),
        "srun": srun_env(5, 1, 1, ntasks=8, tasks_per_node="4(x2)"),
        "mpirun": ompi_env(5, size=8, local_size=4, MASTER_ADDR="h0", MASTER_PORT="1234"),
        "env": {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "h0", "MASTER_PORT": "1234"},
    }
    for launcher, env in envs.items():
        d = discover(env)
        assert d.launcher == launcher
        assert {k: getattr(d, k) for k in expect} == expect, launcher
        assert d.master_addr and d.master_port > 0


def test_torchrun_and_deepspeed_rendezvous():
    d = discover(torchrun_env(6, 2, 1))
    assert (d.master_addr, d.master_port) == ("node-a", 29400)
    d = discover(deepspeed_env(15, 7, 1))
    assert (d.rank, d.local_rank, d.local_world_size, d.node_rank, d.num_nodes) == (15, 7, 8, 1, 2)
    assert d.torch_env() == {"RANK": "15", "WORLD_SIZE": "16", "LOCAL_RANK": "7", "LOCAL_WORLD_SIZE": "8",
                             "MASTER_ADDR": "gpu001", "MASTER_PORT": "29500", "NODE_RANK": "1", "NUM_NODES": "2",
                             "MEGADALLE_LAUNCHER": "deepspeed"}


def test_srun_master_is_first_host_and_port_from_job_id():
    ranks = [discover(srun_env(p, p % 8, p // 8)) for p in range(16)]
    assert [d.rank for d in ranks] == list(range(16))
    assert {(d.master_addr, d.master_port) for d in ranks} == {("gpu001", port_from_job("4242"))}
    assert {d.num_nodes for d in ranks} == {2} and ranks[9].node_rank == 1
    assert discover(srun_env(3, 3, 0, MASTER_PORT="31000")).master_port == 31000
    # Uneven task counts per node ('3,2'): node 1 has 2 local processes.
    d = discover(srun_env(4, 1, 1, ntasks=5, tasks_per_node="3,2"))
    assert (d.local_world_size, d.local_rank, d.node_rank) == (2, 1, 1)


def test_mpirun_single_host_derives_a_shared_port():
    a, b = discover(ompi_env(0, size=2, local_size=2)), discover(ompi_env(1, size=2, local_size=2))
    assert a.master_addr == b.master_addr == "127.0.0.1"
    assert a.master_port == b.master_port == port_from_job("prterun-host-1234@1")


def test_mpirun_across_hosts_without_master_needs_mpi4py_or_master_addr(monkeypatch):
    d = discover(ompi_env(3))  # 2 hosts, no MASTER_ADDR: left for rendezvous()
    assert d.master_addr == "" and d.num_nodes == 2
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if the optional extra is missing
    with pytest.raises(LaunchError, match="install mpi4py"):
        rendezvous(d)


def test_rendezvous_exports_the_torch_variables():
    d = discover(srun_env(9, 1, 1))
    env: dict[str, str] = {}
    d.export(env)
    assert env["RANK"] == "9" and env["WORLD_SIZE"] == "16" and env["MASTER_ADDR"] == "gpu001"
    # Discovery after the export (inside the same srun step) finds the same process.
    assert discover({**srun_env(9, 1, 1), **env}) == d
    # ... and a stale export in a different step is caught.
    with pytest.raises(LaunchError, match="SLURM runs 8 task"):
        discover({**srun_env(1, 1, 0, ntasks=8, tasks_per_node="8"), **env})


@pytest.mark.parametrize("env, match", [
    # WORLD_SIZE exported in the batch script that does not match the srun task count.
    ({**srun_env(3, 3, 0), "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "gpu001",
      "MASTER_PORT": "1"}, "WORLD_SIZE=8 .* SLURM runs 16 task"),
    # The same RANK exported to every srun task.
    ({**srun_env(3, 3, 0), "RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
      "MASTER_ADDR": "gpu001", "MASTER_PORT": "1"}, "SLURM_PROCID=3"),
    ({"RANK": "0"}, "WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "4"}, "RANK is not set"),
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside the world"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "RANK='x' must be an integer"),
    (torchrun_env(1, 1, 0, MASTER_PORT="70000"), "not a TCP port"),
    (torchrun_env(5, 3, 0), "numbered node by node"),  # local rank 3 on node 0 is rank 3, not 5
    (deepspeed_env(3, 3, 0, MASTER_ADDR=""), "no rendezvous address"),
    (ompi_env(1, size=4, local_size=2, OMPI_COMM_WORLD_LOCAL_RANK="0"), "--map-by slot"),
    (srun_env(0, 0, 0, tasks_per_node="8x2"), "task count list"),
    (srun_env(0, 0, 3), "SLURM_NODEID=3"),
    # torchrun claiming 4 nodes in a 2-node SLURM job.
    (torchrun_env(0, 0, 0, nproc=2, nnodes=4, SLURM_JOB_ID="1", SLURM_JOB_NUM_NODES="2"), "job holds 2"),
])
def test_inconsistent_environments_fail_clearly(env, match):
    with pytest.raises(LaunchError, match=match):
        discover(env)
    assert issubclass(LaunchError, ConfigError)  # the CLI prints it without a traceback


def test_expand_hostlist_matches_scontrol():
    assert expand_hostlist("gpu[001-003,007],login1") == ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]
    assert expand_hostlist("r[1-2]-n[08-10]") == ["r1-n08", "r1-n09", "r1-n10", "r2-n08", "r2-n09", "r2-n10"]
    assert expand_hostlist("node7") == ["node7"]
    for bad in ("gpu[1-", "gpu]1[", "gpu[3-1]", "gpu[a-b]"):
        with pytest.raises(LaunchError):
            expand_hostlist(bad)


def test_hostfile_from_scontrol_output(tmp_path):
    scontrol_out = "gpu001\ngpu002\n\n"
    assert build_hostfile(parse_hostnames(scontrol_out), 8) == "gpu001 slots=8\ngpu002 slots=8\n"
    with pytest.raises(LaunchError, match="no host names"):
        parse_hostnames("\n")
    with pytest.raises(LaunchError, match="listed twice"):
        parse_hostnames("a\nb\na\n")
    with pytest.raises(LaunchError, match="not host names"):
        parse_hostnames("scontrol: error: Invalid node name\n")
    with pytest.raises(LaunchError, match="slots=0"):
        build_hostfile(["a"], 0)

    # The command-line form the sbatch scripts use.
    cmd = [sys.executable, "-m", "megadalle", "launch", "hostfile", "--slots", "4"]
    out = tmp_path / "hostfile"
    r = subprocess.run(cmd + ["--out", str(out), "--expect-nodes", "2"], input="n1\nn2\n", text=True,
                       capture_output=True)
    assert r.returncode == 0 and out.read_text() == "n1 slots=4\nn2 slots=4\n"
    r = subprocess.run(cmd + ["--nodelist", "n[1-3]", "--expect-nodes", "2"], text=True, capture_output=True)
    assert r.returncode == 2 and "3 host(s) given but --expect-nodes=2" in r.stderr


def test_single_process_children_drop_every_launcher_variable():
    from megadalle.distributed.launch import without_launcher_vars

    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500", "SLURM_PROCID": "1", "OMPI_COMM_WORLD_RANK": "1",
           "PMI_RANK": "1", "MEGADALLE_LAUNCHER": "srun", "PATH": "/bin", "OMP_NUM_THREADS": "1"}
    assert without_launcher_vars(env) == {"PATH": "/bin", "OMP_NUM_THREADS": "1"}
