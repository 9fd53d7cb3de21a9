"""Checkpoint manager: save, atomic publish of `latest`, retention, discovery, resume.

Layout of a stage's checkpoint folder (e.g. `<run_dir>/transformer/checkpoints/`):

    latest                       text: the tag of the newest complete checkpoint ("step_00001000")
    zero_to_fp32.py              DeepSpeed's recovery script (copied by DeepSpeed)
    step_00001000/               one checkpoint ("tag")
        mp_rank_00_model_states.pt, *_optim_states.pt    DeepSpeed's own files (any ZeRO stage)
        trainer_state.pt         step, updates, LR schedule, EMA, subclass extras (rank 0)
        rank_00000.pt ...        per rank: RNG states (python, numpy, torch[, cuda]), data
                                 position, gradient-hook state
        config.yaml              the resolved config
        meta.json                step, ranks, ZeRO stage, precision, byte size of every file
    .tmp-step_00002000-<run id>/ a save in progress, named by the run that writes it
    ../abandoned-<time>/         checkpoints newer than the one a run was rewound to (never deleted)
    ../.lock                     held by rank 0 while a run writes here (training/run_lock.py)

A save writes everything under `.tmp-<tag>`, waits for every rank, then rank 0 renames the folder
to `<tag>` and replaces `latest` through a temporary file and `os.replace`. A crash at any point
leaves the previous `latest` pointing at a complete checkpoint; a failed save (disk full, say)
removes its own temporary folder and says what failed where. Loading checks meta.json (ranks,
ZeRO stage, model config, file sizes) before DeepSpeed reads anything, so a truncated or mismatched
checkpoint fails with a message that says what to do.

Nothing here deletes a checkpoint a user may still want:
- retention never removes the checkpoint just written nor the one `latest` names;
- resuming from an older step (`checkpoint.resume=<folder>`) moves the newer checkpoints into
  `<stage>/abandoned-<time>/` instead of letting retention delete them later;
- with `latest` missing, the newest complete step folder is resumed, with a log line.

Loading never runs code from the folder: our files and DeepSpeed's go through
`megadalle.safe_load` (weights-only unpickling with an explicit allow-list).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadalle import safe_load
from megadalle.config import CheckpointConfig, Config
from megadalle.distributed import engine as dist_engine
from megadalle.errors import CommandError
from megadalle.training.run_lock import folder_error

log = logging.getLogger("megadalle.training")

TAG_RE = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"
LATEST = "latest"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
# Less free space than this after a failed save (its own files removed) means the disk was full.
FULL_DISK_BYTES = 64 * 2**20


class CheckpointError(CommandError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_meta(ckpt: Path) -> dict[str, Any]:
    path = ckpt / META
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a megadalle checkpoint (no {META}); point to a folder like "
                              f"<run>/transformer/checkpoints/step_00001000 or to its parent")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); resume from an earlier checkpoint with "
                              f"checkpoint.resume=<folder>") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag folder from a tag folder or a checkpoints folder (through its `latest`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / META).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if step_of(tag) is None:  # e.g. "../elsewhere": `latest` only ever names a step folder here
            raise CheckpointError(f"{latest} holds {tag[:80]!r}, not a checkpoint name like step_00001000; "
                                  f"delete it to resume from the newest complete checkpoint in {path}")
        target = path / tag
        if not (target / META).is_file():
            raise CheckpointError(f"{latest} points to {tag!r}, which is missing or incomplete; "
                                  f"pass one of the complete checkpoints in {path} explicitly")
        return target
    complete = sorted((p for p in path.glob("step_*") if (p / META).is_file()), key=lambda p: p.name)
    if complete:
        log.warning("%s has no %s file; resuming from the newest complete checkpoint, %s", path, LATEST,
                    complete[-1].name)
        return complete[-1]
    raise CheckpointError(f"{path} holds no checkpoint (no {LATEST}, no step_* folder with {META})")


def verify_files(ckpt: Path, meta: dict[str, Any]) -> None:
    """Every file meta.json lists is there with its recorded size (catches truncated copies)."""
    problems = []
    for name, size in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, expected {size}")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete or corrupt: {'; '.join(problems[:5])}"
                              f"{' ...' if len(problems) > 5 else ''}. Resume from an earlier checkpoint "
                              f"with checkpoint.resume=<folder>")


def load_torch(path: Path) -> Any:
    """One of our checkpoint files (or DeepSpeed's), weights-only: refuses anything that could run."""
    try:
        return safe_load.load_file(path)
    except safe_load.UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is corrupt, "
                              f"resume from an earlier one with checkpoint.resume=<folder>") from None


class CheckpointManager:
    """Owns one checkpoints folder. Every rank constructs one; rank 0 does the renames.

    `run_id` names this run's temporary save folders; it must be the same on every rank.
    """

    def __init__(self, folder: str | Path, cfg: CheckpointConfig, rank: int = 0, world: int = 1,
                 run_id: str = "0") -> None:
        self.folder = Path(folder)
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.run_id = run_id

    # ---- discovery ----
    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in self.folder.iterdir():
            s = step_of(p.name)
            if s is not None and p.is_dir():
                out.append((s, p))
        return sorted(out)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names or, without that file, the newest complete step folder."""
        if not (self.folder / LATEST).is_file() and not any((p / META).is_file() for _, p in self.checkpoints()):
            return None
        return resolve_checkpoint(self.folder)

    def resume_target(self, resume: str) -> Path | None:
        """The checkpoint to resume from for `checkpoint.resume` (latest | none | a path)."""
        if resume == "none":
            if self.latest() is not None:
                raise CheckpointError(
                    f"{self.folder} already holds checkpoints (latest {self.latest().name}) and checkpoint."
                    f"resume=none would overwrite them; resume (checkpoint.resume=latest) or use another "
                    f"logging.run_dir")
            return None
        if resume == "latest":
            return self.latest()
        return resolve_checkpoint(resume)

    def temp_folders(self) -> list[Path]:
        return sorted(self.folder.glob(TMP_PREFIX + "*")) if self.folder.is_dir() else []

    def remove_stale_temps(self) -> list[Path]:
        """Rank 0, holding the run lock: remove saves that a dead run left half-written.

        The lock proves that no other process writes here, so a temporary folder that is not this
        run's belongs to a run that has ended mid-save; it is never a complete checkpoint."""
        stale = [p for p in self.temp_folders() if not p.name.endswith("-" + self.run_id)]
        for p in stale:
            log.warning("%s: removing %s, a save that an earlier run did not finish", self.folder, p.name)
            shutil.rmtree(p, ignore_errors=True)
        return stale

    def set_aside_newer(self, step: int) -> Path | None:
        """Rank 0: move checkpoints newer than `step` into `<stage>/abandoned-<time>/` (never deletes).

        Resuming from an older step would otherwise leave them for retention to delete, and a later
        `latest` would jump over the steps this run writes."""
        newer = [p for s, p in self.checkpoints() if s > step]
        if not newer:
            return None
        dest = self.folder.parent / time.strftime("abandoned-%Y%m%d-%H%M%S")
        n = 1
        while dest.exists():
            n += 1
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        try:
            dest.mkdir(parents=True)
            for p in newer:
                os.replace(p, dest / p.name)
            if (self.folder / LATEST).is_file():
                os.replace(self.folder / LATEST, dest / LATEST)
            complete = [p for s, p in self.checkpoints() if (p / META).is_file()]
            if complete:
                _write_atomic(self.folder / LATEST, complete[-1].name.encode())
        except OSError as e:
            raise folder_error(dest, e, "move newer checkpoints to") from None
        log.warning("resuming from step %d: moved the %d newer checkpoint(s) (%s) to %s; nothing was deleted",
                    step, len(newer), ", ".join(p.name for p in newer), dest)
        return dest

    # ---- save ----
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any],
             config: Config) -> Path:
        """Write checkpoint `step` from every rank and publish it; returns its folder."""
        tag = tag_for(step)
        tmp_tag = f"{TMP_PREFIX}{tag}-{self.run_id}"
        tmp = self.folder / tmp_tag
        try:
            if self.rank == 0:
                self.folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # only ever this run's own folder
            dist_engine.barrier()
            engine.save_checkpoint(str(self.folder), tag=tmp_tag, save_latest=False)
            torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                torch.save(trainer_state, tmp / TRAINER_STATE)
                config.save(tmp / "config.yaml")
        except (OSError, RuntimeError) as e:
            # torch reports a full disk as "PytorchStreamWriter failed writing file": say what it was.
            raise self._save_failed(step, tmp, e) from None
        dist_engine.barrier()
        if self.rank == 0:
            try:
                self._publish(step, tag, tmp, engine, config)
            except OSError as e:
                raise self._save_failed(step, tmp, e) from None
        dist_engine.barrier()
        return self.folder / tag

    def _publish(self, step: int, tag: str, tmp: Path, engine: Any, config: Config) -> None:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"step": step, "world_size": self.world, "zero_stage": engine.zero_optimization_stage(),
                "precision": config.precision.mode, "time": time.time(), "files": files}
        _write_atomic(tmp / META, json.dumps(meta, indent=1).encode())
        final = self.folder / tag
        if final.exists():
            # Re-saving a step (after a resume): the old copy goes only once the new one is complete.
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        _write_atomic(self.folder / LATEST, tag.encode())
        self._prune(keep_tag=tag)

    def _save_failed(self, step: int, tmp: Path, e: Exception) -> CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # free what this save took; it was never published
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else f"{type(e).__name__}: {e}"
        reason = reason.splitlines()[0][:300]
        try:
            free_bytes = shutil.disk_usage(self.folder).free
            free = f"; {free_bytes / 2**20:.1f} MiB free there"
            # torch's writer says only "file write failed"; the free space tells the real cause.
            if free_bytes < FULL_DISK_BYTES:
                reason = f"the file system is full: {reason}"
        except OSError:
            free = ""
        latest = self.folder / LATEST
        kept = (f"the previous checkpoint ({latest.read_text(encoding='utf-8').strip()}) is intact"
                if latest.is_file() else "no earlier checkpoint was touched")
        return CheckpointError(f"saving the checkpoint of step {step} in {self.folder} failed ({reason}"
                               f"{free}); {kept}. Free space or fix the folder, then resume with "
                               f"checkpoint.resume=latest")

    def _prune(self, keep_tag: str) -> None:
        ckpts = self.checkpoints()
        keep = {s for s, _ in ckpts[-self.cfg.keep_last:]}
        if self.cfg.keep_every:
            keep |= {s for s, _ in ckpts if s % self.cfg.keep_every == 0}
        latest = self.folder / LATEST
        protected = {keep_tag, latest.read_text(encoding="utf-8").strip() if latest.is_file() else keep_tag}
        for s, p in ckpts:
            if s not in keep and p.name not in protected:
                shutil.rmtree(p, ignore_errors=True)

    # ---- load ----
    def check_compatible(self, ckpt: Path, config: Config, model_sections: tuple[str, ...], zero_stage: int,
                         topology_may_change: bool = False) -> dict:
        """meta.json of `ckpt` after checking it fits this run. `topology_may_change`: another number of
        ranks or ZeRO stage is the caller's business (training/elastic.py)."""
        meta = read_meta(ckpt)
        verify_files(ckpt, meta)
        if not topology_may_change:
            self._check_topology(ckpt, meta, zero_stage)
        if meta.get("precision") != config.precision.mode:
            raise CheckpointError(
                f"checkpoint {ckpt} was written with precision.mode={meta.get('precision')} and this run uses "
                f"{config.precision.mode}; resume with --precision.mode={meta.get('precision')}")
        saved = Config.load(ckpt / "config.yaml").to_dict() if (ckpt / "config.yaml").is_file() else None
        if saved is not None:
            now = config.to_dict()
            diffs = [f"{sec}.{k}: checkpoint {saved[sec].get(k)!r}, now {now[sec].get(k)!r}"
                     for sec in model_sections for k in now[sec] if saved[sec].get(k) != now[sec].get(k)]
            if diffs:
                raise CheckpointError(f"checkpoint {ckpt} holds a different model: {'; '.join(diffs)}. "
                                      f"Use the checkpoint's settings or another logging.run_dir")
        return meta

    def _check_topology(self, ckpt: Path, meta: dict[str, Any], zero_stage: int) -> None:
        if meta.get("world_size") != self.world:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks and this run has {self.world}; "
                f"the data position and RNG states are per rank, so resume with {meta.get('world_size')} ranks "
                f"(or start from its weights: megadalle convert zero-to-safetensors)")
        if meta.get("zero_stage") != zero_stage:
            raise CheckpointError(
                f"checkpoint {ckpt} was written with distributed.zero_stage={meta.get('zero_stage')} and this run "
                f"uses {zero_stage}; resume with --distributed.zero_stage={meta.get('zero_stage')}")

    def load(self, engine: Any, ckpt: Path, universal: Path | None = None,
             rank: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load DeepSpeed state into `engine`; returns (trainer_state, the state of `rank`, this rank's
        by default). `universal`: DeepSpeed's universal checkpoint of `ckpt` to load the engine from
        (another number of ranks or ZeRO stage; training/elastic.py)."""
        rank = self.rank if rank is None else rank
        rank_file = ckpt / f"rank_{rank:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no state for rank {rank} ({rank_file.name})")
        # Before DeepSpeed opens anything: a file naming a global outside the list is refused by name.
        safe_load.check_folder(ckpt)
        trainer_state = load_torch(ckpt / TRAINER_STATE)
        rank_state = load_torch(rank_file)
        source = universal or ckpt
        try:
            with safe_load.weights_only_loads():  # DeepSpeed passes weights_only=False; this overrides it
                path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_module_strict=True,
                                                 load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types for unreadable files
            refusal = safe_load.refusal_from(ckpt, e)
            if refusal is not None:
                raise refusal from None
            raise CheckpointError(f"DeepSpeed could not load {source} ({type(e).__name__}: {e}); the checkpoint "
                                  f"is corrupt or from another model; resume from an earlier one with "
                                  f"checkpoint.resume=<folder>") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {source}; the checkpoint is incomplete")
        return trainer_state, rank_state
