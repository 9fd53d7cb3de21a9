"""Faults with real processes over gloo: a rank that dies (SIGKILL) or hangs (SIGSTOP) ends the
others within distributed.timeout_s with the requeue exit code and a message naming the cause;
an ordinary error ends all with exit code 1; SIGUSR1 on one rank makes the real Trainer stop
every rank after the same step with a checkpoint and EXIT_REQUEUE.

The ranks are plain processes with RANK/WORLD_SIZE exported (no launcher), so that no launcher
kills the survivors for us: what ends them is megadalle's own fault handling."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadalle.cli import COMMANDS
from megadalle.distributed.watchdog import EXIT_PEER_FAILURE, EXIT_REQUEUE, GracefulStop

pytestmark = pytest.mark.slow
TIMEOUT_S = 6.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(world: int, out: Path, steps: int = 100000, sleep: float = 0.05,
                extra: list[str] = ()) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megadalle.distributed.smoke", "--backend", "gloo", "--steps", str(steps),
             "--sleep", str(sleep), "--timeout", str(TIMEOUT_S), "--out", str(out), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_until_stepping(procs, out: Path, min_step: int = 3, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        steps = []
        for r in range(len(procs)):
            f = out / f"progress-{r}"
            steps.append(int(f.read_text() or 0) if f.exists() else 0)
        if min(steps) >= min_step:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        p.kill()
    raise AssertionError("ranks did not start stepping: " + " | ".join(p.communicate()[1][-500:] for p in procs))


def finish(procs, limit_s: float) -> list[tuple[int, str]]:
    """Wait for each process; the time limit counts from the call."""
    deadline = time.monotonic() + limit_s
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            results.append((None, err))
            continue
        results.append((p.returncode, err))
    return results


@pytest.mark.parametrize("world, victim, how", [(2, 0, signal.SIGKILL), (3, 1, signal.SIGSTOP)])
def test_dead_or_hung_rank_ends_the_others_within_the_timeout(tmp_path, world, victim, how):
    """Rank 0 killed: it served the store, so the others lose contact (or their collective
    breaks). Rank 1 stopped: its sockets stay open, so only rank 0's heartbeat watch can tell,
    and rank 2 learns it from rank 0's note."""
    procs = start_ranks(world, tmp_path)
    try:
        wait_until_stepping(procs, tmp_path)
        os.kill(procs[victim].pid, how)
        t0 = time.monotonic()
        survivors = [p for r, p in enumerate(procs) if r != victim]
        results = finish(survivors, limit_s=TIMEOUT_S + 2)  # +2 s: process exit and pipe drain
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for code, err in results:
        assert code is not None, f"a survivor was still running {TIMEOUT_S + 2:.0f} s after rank {victim} {how.name}"
        assert code == EXIT_PEER_FAILURE, err[-2000:]
        assert "[megadalle watchdog]" in err and "exit code 76" in err, err[-2000:]
    if how == signal.SIGSTOP:
        for _, err in results:  # both survivors name the hung rank
            assert f"rank {victim} stopped responding" in err, err[-2000:]
    assert elapsed < TIMEOUT_S + 2


def test_an_error_on_one_rank_ends_all_without_requeue(tmp_path):
    """A bug is not a peer failure: requeueing would only repeat it, so every rank exits 1."""
    procs = start_ranks(2, tmp_path, extra=["--fail-rank", "1", "--fail-step", "3"])
    results = finish(procs, limit_s=90)
    assert [code for code, _ in results] == [1, 1], [e[-1500:] for _, e in results]
    assert "injected failure on rank 1" in results[1][1]  # its own traceback
    assert "rank 1 failed with an error: RuntimeError: injected failure" in results[0][1]
    assert "not requeued" in results[0][1]


def _trainer(run_dir: Path) -> tuple[list[str], Path]:
    """`megadalle train` on the tiny preset (synthetic tokens) once it is registered, else the
    Trainer base through tests/trainer_toy.py; and the folder its metrics/checkpoints go to."""
    common = ["train.steps=100000", "checkpoint.every_steps=100000", "train.log_every=1",
              "logging.progress=false", "logging.tensorboard=false", f"distributed.timeout_s={TIMEOUT_S * 5:.0f}"]
    if "train" in COMMANDS:
        return ([sys.executable, "-m", "megadalle", "train", "--preset", "tiny", "--train.synthetic_data=true",
                 "--train.micro_batch_size=2", "--distributed.backend=gloo", f"--logging.run_dir={run_dir}",
                 *("--" + c for c in common)], run_dir / "transformer")
    return ([sys.executable, str(Path(__file__).parent / "trainer_toy.py"), "--run_dir", str(run_dir),
             "--step_delay", "0.1", *common], run_dir / "zero0" / "toy")


def test_trainer_stops_on_sigusr1_with_a_checkpoint_at_the_same_step(tmp_path):
    """The real Trainer, 2 ranks over gloo: SIGUSR1 to one rank, both ranks leave after the same
    step, the checkpoint of that step is `latest`, exit code 75."""
    port = free_port()
    cmd, folder = _trainer(tmp_path)
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics = folder / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        os.kill(procs[1].pid, signal.SIGUSR1)
        results = finish(procs, limit_s=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [code for code, _ in results] == [EXIT_REQUEUE, EXIT_REQUEUE], [e[-2000:] for _, e in results]
    assert "stopped early (another rank received a stop request)" in results[0][1]
    # Rank 0 logs every step (train.log_every=1): its last step is where both ranks stopped.
    last_step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert (folder / "checkpoints" / "latest").read_text().strip() == f"step_{last_step:08d}"
    assert f"checkpoint of step {last_step} in" in results[0][1]


def test_graceful_stop_single_process(monkeypatch):
    stop = GracefulStop(stop_at=time.time() - 1)  # deadline already passed
    assert stop.should_stop() and "deadline" in stop.reason and stop.exit_code == EXIT_REQUEUE
    stop = GracefulStop().install()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop() and stop.reason == "received SIGTERM"
    finally:
        stop.uninstall()
    monkeypatch.setenv("MEGADALLE_STOP_AT", "tomorrow")
    with pytest.raises(ValueError, match="unix seconds"):
        GracefulStop()
