"""The sbatch scripts: syntax, consistent counts, the right entry points, and the requeue
protocol run for real against stand-ins for srun/scontrol/squeue (tests/fake_slurm), with the
ranks talking over gloo as two "nodes" (localhost and 127.0.0.1) on this machine."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadalle.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "slurm"
FAKE = Path(__file__).resolve().parent / "fake_slurm"
SCRIPTS = {"dvae_1node.sbatch": "train-dvae", "dvae_multinode.sbatch": "train-dvae",
           "dalle_1node.sbatch": "train", "dalle_multinode.sbatch": "train"}


def sbatch_options(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))


def script_vars(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.M))


@pytest.mark.parametrize("name", [*SCRIPTS, "common.sh", "env.sh"])
def test_scripts_parse(name):
    r = subprocess.run(["bash", "-n", str(SLURM / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name, command", SCRIPTS.items())
def test_counts_and_entry_points_are_consistent(name, command):
    text = (SLURM / name).read_text()
    opts, v = sbatch_options(text), script_vars(text)
    assert v["COMMAND"] == command
    assert opts["nodes"] == v["NODES"]
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] == v["GPUS_PER_NODE"]  # one rank per GPU
    assert ("1node" in name) == (v["NODES"] == "1")
    m = re.fullmatch(r"B:USR1@(\d+)", opts["signal"])
    assert m and int(m.group(1)) >= 60  # enough time to write a checkpoint
    assert "requeue" in opts
    assert text.rstrip().endswith('/slurm/common.sh"')


def _env(tmp_path, **extra) -> dict[str, str]:
    log = tmp_path / "slurm.log"
    log.touch()
    return {**os.environ, "PATH": f"{FAKE}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_LOG": str(log), "SLURM_JOB_ID": "777", "SLURM_SUBMIT_DIR": str(tmp_path),
            "MEGADALLE_ROOT": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in extra.items()}}


@pytest.mark.parametrize("name, command", SCRIPTS.items())
def test_scripts_launch_the_right_command_with_their_counts(tmp_path, name, command):
    text = (SLURM / name).read_text()
    v = script_vars(text)
    nodes, gpus = int(v["NODES"]), int(v["GPUS_PER_NODE"])
    hosts = ",".join(f"gpu{i:03d}" for i in range(1, nodes + 1))
    env = _env(tmp_path, FAKE_SRUN_RECORD_ONLY=1, SLURM_JOB_NODELIST=hosts, SLURM_JOB_NUM_NODES=nodes)
    r = subprocess.run(["bash", str(SLURM / name), "--preset", "tiny"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "slurm.log").read_text()
    assert (f"srun nodes={nodes} ntasks-per-node={gpus} kill-on-bad-exit=0 "
            f"cmd={sys.executable} -u -m megadalle {command} --preset tiny") in log
    hostfile = (tmp_path / "runs/slurm/777/hostfile").read_text().splitlines()
    assert hostfile[0] == f"gpu001 slots={gpus}" and len(hostfile) == nodes


def test_deepspeed_launcher_gets_the_hostfile_and_the_network_env(tmp_path):
    env = _env(tmp_path, LAUNCHER="deepspeed", SLURM_JOB_NODELIST="gpu001,gpu002,gpu003,gpu004,gpu005,gpu006,"
               "gpu007,gpu008", SLURM_JOB_NUM_NODES=8, NCCL_IB_HCA="mlx5_0")
    r = subprocess.run(["bash", str(SLURM / "dvae_multinode.sbatch"), "--preset", "small"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "slurm.log").read_text()
    hostfile = tmp_path / "runs/slurm/777/hostfile"
    assert (f"deepspeed --hostfile {hostfile} --num_nodes 8 --num_gpus 8 --master_addr gpu001 --master_port "
            in log)
    assert "--no_local_rank --module megadalle train-dvae --preset small" in log
    ds_env = log.split("ds_env ", 1)[1]
    # env.sh's settings and the user's own NCCL choice reach every rank through the env file.
    assert "NCCL_SOCKET_IFNAME=^lo,docker0" in ds_env and "NCCL_IB_HCA=mlx5_0" in ds_env
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in ds_env and "MEGADALLE_STOP_AT=" in ds_env


@pytest.mark.parametrize("command", sorted(set(SCRIPTS.values())))
def test_entry_points_exist(command):
    assert command in COMMANDS, f"`megadalle {command}` (run by the sbatch scripts) is not a registered command"
    r = subprocess.run([sys.executable, "-m", "megadalle", command, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _two_node_job(tmp_path, script_args=(), **extra) -> tuple[subprocess.Popen, Path]:
    """A 2-node x 1-GPU job script sourcing the real slurm/common.sh, running the smoke program."""
    job = tmp_path / "job.sbatch"
    job.write_text('#!/bin/bash\nNODES=2\nGPUS_PER_NODE=1\nCOMMAND=train\n'
                   'source "$MEGADALLE_ROOT/slurm/common.sh"\n')
    out = tmp_path / "ranks"
    program = f"{sys.executable} -m megadalle smoke --backend gloo --steps 100000 --sleep 0.05 " \
              f"--timeout 20 --out {out}"
    env = _env(tmp_path, **{"SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_JOB_NUM_NODES": 2,
                            "MEGADALLE_PROGRAM": program, **extra})
    p = subprocess.Popen(["bash", str(job), *script_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    return p, out


def _progress(out: Path, ranks: int = 2) -> int:
    steps = [int((out / f"progress-{r}").read_text() or 0) if (out / f"progress-{r}").exists() else 0
             for r in range(ranks)]
    return min(steps)


def test_srun_ranks_discover_their_nodes(tmp_path):
    p, _ = _two_node_job(tmp_path, MEGADALLE_PROGRAM=f"{sys.executable} -m megadalle launch env")
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 0, stderr[-2000:]
    envs = sorted(re.findall(r"DistEnv\([^)]*\)", stdout))
    port = re.search(r"master (\S+):(\d+)", stdout).group(2)
    assert envs == [f"DistEnv(rank={r}, world_size=2, local_rank=0, local_world_size=1, launcher='srun', "
                    f"node_rank={r}, num_nodes=2, master_addr='localhost', master_port={port})" for r in (0, 1)]


@pytest.mark.slow
def test_usr1_before_time_limit_saves_requeues_and_the_requeued_job_resumes(tmp_path):
    """The whole protocol with `megadalle train` on 2 "nodes": USR1 to the batch shell -> srun ->
    every rank stops after the same step with a checkpoint -> exit 75 -> scontrol requeue; the
    job's second run (SLURM_RESTART_COUNT=1) resumes from that checkpoint and finishes."""
    run = tmp_path / "run"
    train = ["--preset", "tiny", "--train.synthetic_data=true", "--train.micro_batch_size=2", "--train.log_every=1",
             "--checkpoint.every_steps=100000", "--logging.progress=false", "--logging.tensorboard=false",
             "--distributed.backend=gloo", f"--logging.run_dir={run}"]
    p, _ = _two_node_job(tmp_path, script_args=(*train, "--train.steps=100000"), MEGADALLE_PROGRAM="")
    metrics = run / "transformer" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while p.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` delivers to the batch shell
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-3000:]
    assert "got SIGUSR1" in stderr and "requeueing job 777" in stdout
    assert "requeue 777" in (tmp_path / "slurm.log").read_text()
    stopped_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    latest = run / "transformer" / "checkpoints" / "latest"
    assert latest.read_text().strip() == f"step_{stopped_at:08d}"

    # The requeued job: same script, same arguments (here two more steps), restart count 1.
    p, _ = _two_node_job(tmp_path, script_args=(*train, f"--train.steps={stopped_at + 2}"), MEGADALLE_PROGRAM="",
                         SLURM_RESTART_COUNT=1)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-3000:]
    assert "(restart 1/20)" in stdout and "train finished" in stdout
    assert f"resumed from {latest.parent / f'step_{stopped_at:08d}'}" in stdout
    assert latest.read_text().strip() == f"step_{stopped_at + 2:08d}"


def test_deadline_is_exported_and_requeues_are_capped(tmp_path):
    """Each rank gets MEGADALLE_STOP_AT = job end - STOP_MARGIN_S (the ranks stop on it by
    themselves: test_faults covers GracefulStop's deadline); a job already requeued MAX_REQUEUES
    times is not requeued again."""
    rank = tmp_path / "rank.sh"
    rank.write_text('echo "$SLURM_PROCID $MEGADALLE_STOP_AT $(date +%s)" >> "$1"; exit 75\n')
    seen = tmp_path / "seen"
    p, _ = _two_node_job(tmp_path, script_args=(str(seen),), FAKE_END_IN_S=3600, STOP_MARGIN_S=600,
                         SLURM_RESTART_COUNT=3, MAX_REQUEUES=3, MEGADALLE_PROGRAM=f"bash {rank}")
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 75 and "already requeued 3 times; giving up" in stderr, stderr[-2000:]
    assert "requeue" not in (tmp_path / "slurm.log").read_text()
    rows = sorted(line.split() for line in seen.read_text().splitlines())
    assert [r[0] for r in rows] == ["0", "1"]
    for _, stop_at, now in rows:
        assert 3000 - 60 <= int(stop_at) - int(now) <= 3000 + 1  # 3600 s left - 600 s margin


@pytest.mark.parametrize("extra, code, message", [
    ({"SLURM_JOB_NUM_NODES": 3}, 2, "holds 3 node(s) but the script says NODES=2"),
    ({"SLURM_JOB_NODELIST": "localhost,localhost"}, 2, "listed twice"),
    ({"LAUNCHER": "mpirun"}, 2, "choose srun or deepspeed"),
    ({"MEGADALLE_PROGRAM": "false"}, 1, "failed with exit code 1; not requeueing"),
])
def test_job_script_errors(tmp_path, extra, code, message):
    p, _ = _two_node_job(tmp_path, **extra)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == code and message in stderr, stderr[-2000:]
    assert "requeue" not in (tmp_path / "slurm.log").read_text()


def test_outside_a_job_the_script_refuses(tmp_path):
    env = _env(tmp_path)
    env.pop("SLURM_JOB_ID")
    r = subprocess.run(["bash", str(SLURM / "dalle_1node.sbatch")], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr
