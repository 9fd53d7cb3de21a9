"""Faults with real processes over gloo: a rank that dies (SIGKILL) or hangs (SIGSTOP) ends the
others within distributed.timeout_s with the requeue exit code and a message naming the cause;
an ordinary error ends all with exit code 1; SIGUSR1 on one rank stops every rank after the same
step with EXIT_REQUEUE.

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

from megadalle.config import ConfigError
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
            [sys.executable, "-m", "megadalle", "smoke", "--backend", "gloo", "--steps", str(steps),
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


def test_sigusr1_on_one_rank_stops_all_after_the_same_step(tmp_path):
    """Only rank 1 gets the signal; should_stop() agrees across ranks, so both leave after the
    same step with EXIT_REQUEUE. (The Trainer's use of it, with a checkpoint and a resumed
    requeue, runs end to end in test_slurm.py.)"""
    procs = start_ranks(2, tmp_path, sleep=0.1)
    try:
        wait_until_stepping(procs, tmp_path, min_step=2)
        os.kill(procs[1].pid, signal.SIGUSR1)
        results = finish(procs, limit_s=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [code for code, _ in results] == [EXIT_REQUEUE, EXIT_REQUEUE], [e[-1000:] for _, e in results]
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert reports[0]["steps"] == reports[1]["steps"] and all(r["stopped"] for r in reports)
    assert reports[1]["reason"] == "received SIGUSR1"
    assert reports[0]["reason"] == "another rank received a stop request"


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
    with pytest.raises(ConfigError, match="unix seconds"):
        GracefulStop()
