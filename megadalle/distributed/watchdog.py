"""Fault handling: a dead rank ends the job instead of hanging it, and a pre-emption or time
limit ends it with a checkpoint, both with exit codes the SLURM scripts turn into a requeue.

Two pieces, both used by the training loop:

- `GracefulStop` turns SIGUSR1/SIGTERM (what `#SBATCH --signal=B:USR1@120` and pre-emption
  deliver) and an optional wall-clock deadline (MEGADALLE_STOP_AT, unix seconds; for launchers
  that cannot forward signals, e.g. the deepspeed launcher over pdsh) into a stop that every
  rank agrees on: `should_stop()` all-reduces the local flag, so all ranks leave the loop after
  the same step, save one consistent checkpoint and exit with EXIT_REQUEUE.

- `Watchdog` runs a thread that heartbeats through the rendezvous store (a separate client of
  the TCPStore that rank 0 serves at MASTER_ADDR:MASTER_PORT). Rank 0 watches everyone's
  heartbeat; when one stays still for timeout_s / 2 it publishes an abort note that every
  rank's thread reads within one interval; when rank 0 itself dies its store goes with it and
  every other rank's next store call fails. Either way the rank prints what happened and
  leaves with EXIT_PEER_FAILURE through os._exit, which works even while the main thread is
  blocked inside a collective that would otherwise wait forever (NCCL) or for the process
  group's timeout. `guard()` gives the same clean exit when a collective raises because a peer
  vanished (gloo notices a closed socket at once).

Exit codes (75/76 from sysexits' EX_TEMPFAIL family: "try again later"):
  EXIT_REQUEUE = 75       stopped on request, checkpoint written: resubmit to resume.
  EXIT_PEER_FAILURE = 76  another rank died or hung: resubmit to resume from the last checkpoint.
  EXIT_ERROR = 1          a rank raised an ordinary error (a bug, bad data): the others end with
                          1 too, so that a deterministic failure is not requeued over and over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Iterator

from megadalle.config import ConfigError
from megadalle.distributed.launch import DistEnv

EXIT_ERROR = 1
EXIT_REQUEUE = 75
EXIT_PEER_FAILURE = 76
REQUEUE_EXIT_CODES = (EXIT_REQUEUE, EXIT_PEER_FAILURE)
STOP_AT_ENV = "MEGADALLE_STOP_AT"


class GracefulStop:
    """Signal/deadline -> a stop request that all ranks see at the same step.

    Usage (every rank, same steps):
        stop = GracefulStop().install()
        for step in ...:
            train_step()
            if stop.should_stop():
                save_checkpoint(); sys.exit(stop.exit_code)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM),
                 stop_at: float | None = None) -> None:
        self.signals = signals
        env_stop = os.environ.get(STOP_AT_ENV, "").strip()
        if stop_at is None and env_stop:
            try:
                stop_at = float(env_stop)
            except ValueError:
                raise ConfigError(f"{STOP_AT_ENV}={env_stop!r} must be unix seconds (date +%s); "
                                  f"fix or unset it") from None
        self.stop_at = stop_at
        self.reason = ""
        self._flag = False
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int:
        return EXIT_REQUEUE

    @property
    def flagged(self) -> bool:
        """A stop was requested here or seen from another rank (no deadline check)."""
        return self._flag

    @property
    def requested(self) -> bool:
        """This rank's own view (no communication)."""
        if not self._flag and self.stop_at is not None and time.time() >= self.stop_at:
            self.request(f"deadline {STOP_AT_ENV}={self.stop_at:.0f} reached")
        return self._flag

    def request(self, reason: str) -> None:
        if not self._flag:
            self.reason = reason
        self._flag = True

    def _handler(self, signum: int, frame: object) -> None:
        # Only set a flag: saving from inside a signal handler could interrupt a collective.
        self.request(f"received {signal.Signals(signum).name}")

    def install(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulStop.install() must run in the main thread (Python delivers signals there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous.clear()

    def should_stop(self) -> bool:
        """True on every rank once any rank has a stop request. Collective when a process group
        is up: call it on all ranks at the same step."""
        local = self.requested
        import torch.distributed as dist  # lazily: importing torch.distributed is not free

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return local
        import torch

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not local:
            self.request("another rank received a stop request")
        return bool(flag.item())


# Messages of collectives that failed because a peer vanished (gloo's tcp transport, NCCL).
# A collective that times out (gloo: "Timed out waiting ... for recv") is one a peer never joined.
_PEER_FAILURE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                         "Timed out waiting", "remote worker crash", "NCCL communicator was aborted",
                         "ProcessGroupNCCL")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _say(rank: int, msg: str) -> None:
    print(f"[megadalle watchdog] rank {rank}: {msg}", file=sys.stderr, flush=True)


class Watchdog:
    """Heartbeat thread that ends this rank within `timeout_s` of any rank dying.

    Start it after the process group is up (rank 0's store must be serving), stop it before the
    process group is torn down. Rank 0's stop() waits (at most timeout_s) for the others to stop
    theirs, so that its store outlives every client's last heartbeat.
    """

    PREFIX = "megadalle/watchdog/"

    def __init__(self, env: DistEnv, timeout_s: float, interval_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.env = env
        self.timeout_s = float(timeout_s)
        # Declared dead after half the timeout without a heartbeat, checked 8 times per
        # timeout: detection plus the others' reaction stays well inside timeout_s.
        self.stale_s = self.timeout_s / 2
        self.interval_s = interval_s or min(5.0, max(0.05, self.timeout_s / 8))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None

    # -- store helpers --
    def _key(self, what: str, rank: int | None = None) -> str:
        return f"{self.PREFIX}{what}" + ("" if rank is None else f"/{rank}")

    def _connect(self):
        import torch.distributed as dist

        return dist.TCPStore(self.env.master_addr, self.env.master_port, is_master=False,
                             timeout=timedelta(seconds=max(1.0, self.stale_s)), wait_for_workers=False)

    def start(self) -> "Watchdog":
        if not self.env.is_distributed:
            return self
        self._store = self._connect()
        self._store.set(self._key("hb", self.env.rank), "0")
        self._thread = threading.Thread(target=self._run, name="megadalle-watchdog", daemon=True)
        self._thread.start()
        return self

    _FATAL = "FATAL "  # prefix of an abort note about an ordinary error: do not requeue

    def _die(self, msg: str) -> None:
        if self._stop.is_set():
            return
        if self.env.rank == 0:
            # Rank 0's store dies with it: give the others an interval and a half to read the note.
            time.sleep(1.5 * self.interval_s)
        if msg.startswith(self._FATAL):
            _say(self.env.rank, f"{msg[len(self._FATAL):]}; ending this rank with exit code {EXIT_ERROR} "
                                f"(not requeued: fix the error)")
            os._exit(EXIT_ERROR)
        _say(self.env.rank, f"{msg}; ending this rank with exit code {EXIT_PEER_FAILURE} "
                            f"(the SLURM script requeues the job, which resumes from the latest checkpoint)")
        os._exit(EXIT_PEER_FAILURE)

    def _note(self) -> str:
        with contextlib.suppress(Exception):
            if self._store is not None and self._store.check([self._key("abort")]):
                return self._store.get(self._key("abort")).decode()
        return ""

    def _run(self) -> None:
        rank, world = self.env.rank, self.env.world_size
        beats = 0
        last_value: dict[int, bytes | None] = {r: None for r in range(world)}
        last_change = {r: time.monotonic() for r in range(world)}
        abort_key, hb_keys = self._key("abort"), [self._key("hb", r) for r in range(world)]
        done_keys = [self._key("done", r) for r in range(world)]
        while not self._stop.wait(self.interval_s):
            try:
                beats += 1
                self._store.set(hb_keys[rank], str(beats))
                if self._store.check([abort_key]):
                    self._die(self._store.get(abort_key).decode())
                now = time.monotonic()
                if rank != 0:
                    # Rank 0 may be dead while its store lives on (torchrun's agent serves the
                    # store): watch its heartbeat too.
                    value = self._store.get(hb_keys[0]) if self._store.check([hb_keys[0]]) else None
                    if self._store.check([done_keys[0]]) or value != last_value[0]:
                        last_value[0], last_change[0] = value, now
                    elif now - last_change[0] > self.stale_s:
                        self._die(f"rank 0 stopped responding (no heartbeat for {now - last_change[0]:.1f} s, "
                                  f"limit distributed.timeout_s/2 = {self.stale_s:.1f} s)")
                    continue
                for r in range(1, world):
                    if self._store.check([done_keys[r]]):
                        last_change[r] = now  # stopped cleanly: not a failure
                        continue
                    value = self._store.get(hb_keys[r]) if self._store.check([hb_keys[r]]) else None
                    if value != last_value[r]:
                        last_value[r], last_change[r] = value, now
                    elif now - last_change[r] > self.stale_s:
                        note = (f"rank {r} stopped responding (no heartbeat for {now - last_change[r]:.1f} s, "
                                f"limit distributed.timeout_s/2 = {self.stale_s:.1f} s): it died or its host "
                                f"is unreachable; reported by rank 0")
                        self._store.set(abort_key, note)
                        self._die(note)
            except Exception as e:  # the store is rank 0's: any failure means rank 0 is gone
                if self._stop.is_set():
                    return
                self._die(f"lost contact with rank 0 ({self.env.master_addr}:{self.env.master_port}: "
                          f"{type(e).__name__}: {e}); rank 0 died or its host is unreachable")

    def fail(self, reason: str) -> None:
        """This rank cannot go on: tell the others (they end within one interval) and exit."""
        note = self._note()
        if note.startswith(self._FATAL):  # our collective broke because that rank hit an error
            self._die(note)
        with contextlib.suppress(Exception):
            if self._store is not None:
                self._store.set(self._key("abort"), f"rank {self.env.rank} failed: {reason}")
        self._die(f"{reason} (the other ranks are told)")

    def fatal(self, reason: str) -> None:
        """This rank hit an ordinary error: the others end with EXIT_ERROR, not a requeue code.
        Returns, so that the caller can print its traceback."""
        if self._store is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._store.set(self._key("abort"), f"{self._FATAL}rank {self.env.rank} failed with an error: {reason}")
            if self.env.rank == 0:
                time.sleep(1.5 * self.interval_s)  # our store dies with us: let the others read it

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a collective that raised because a peer vanished into a clean exit (code 76).
        Other errors propagate unchanged: a bug must not be requeued forever."""
        import torch.distributed as dist

        try:
            yield
        except dist.DistError as e:  # DistBackendError, DistNetworkError, DistStoreError
            self.fail(f"{type(e).__name__}: {_first_line(e)}")
        except RuntimeError as e:
            # gloo reports a vanished peer as a plain RuntimeError from its transport.
            if not is_peer_failure(e):
                raise
            self.fail(f"a collective failed: {_first_line(e)}")

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with contextlib.suppress(Exception):
            self._store.set(self._key("done", self.env.rank), "1")
            if self.env.rank == 0:
                keys = [self._key("done", r) for r in range(1, self.env.world_size)]
                deadline = time.monotonic() + self.timeout_s
                while keys and not self._store.check(keys) and time.monotonic() < deadline:
                    time.sleep(self.interval_s)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_peer_failure(e: BaseException) -> bool:
    """Did this exception come from a collective whose peer vanished or never joined?"""
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _PEER_FAILURE_MARKERS))


class TrainingGuard:
    """GracefulStop + Watchdog for a training loop, in three calls (all ranks):

        guard = TrainingGuard(cfg.distributed).start()   # after the process group is up
        while ...:
            ...
            if guard.should_stop():                       # collective, every step
                break
        save_checkpoint()                                 # the loop's final save
        guard.finish()                                    # SystemExit(75) if stopped early

    While started, an uncaught peer-failure exception (is_peer_failure) ends the process with
    EXIT_PEER_FAILURE and a clear message instead of a traceback and exit code 1.
    """

    def __init__(self, dist_cfg: Any, env: DistEnv | None = None) -> None:
        from megadalle.distributed.launch import discover

        self.env = env or discover()
        self.stop = GracefulStop()
        self.dog = Watchdog(self.env, dist_cfg.timeout_s)
        self._previous_hook = None

    @property
    def stopped(self) -> bool:
        return self.stop.flagged

    def start(self) -> "TrainingGuard":
        if threading.current_thread() is threading.main_thread():
            self.stop.install()
        self.dog.start()
        self._previous_hook, sys.excepthook = sys.excepthook, self._excepthook
        return self

    def should_stop(self) -> bool:
        return self.stop.should_stop()

    def _excepthook(self, typ: type, exc: BaseException, tb: Any) -> None:
        if self.dog._thread is not None:
            if is_peer_failure(exc):
                self.dog.fail(f"{typ.__name__}: {_first_line(exc)}")
            self.dog.fatal(f"{typ.__name__}: {_first_line(exc)}")
        (self._previous_hook or sys.__excepthook__)(typ, exc, tb)

    def close(self) -> None:
        self.dog.stop()
        self.stop.uninstall()
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_hook or sys.__excepthook__

    def finish(self, where: str = "") -> None:
        """Close; when a stop was requested, exit with EXIT_REQUEUE (the checkpoint is written)."""
        self.close()
        if self.stopped:
            if self.env.is_main:
                print(f"megadalle: stopped early ({self.stop.reason}){'; ' + where if where else ''}; exiting with "
                      f"code {EXIT_REQUEUE} so that the SLURM script requeues and the run resumes",
                      file=sys.stderr, flush=True)
            raise SystemExit(EXIT_REQUEUE)
