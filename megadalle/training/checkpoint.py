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
    .tmp-step_00002000/          a save in progress (or one a crash interrupted; removed next save)

A save writes everything under `.tmp-<tag>`, waits for every rank, then rank 0 renames the folder
to `<tag>` and replaces `latest` through a temporary file and `os.replace`. A crash at any point
leaves the previous `latest` pointing at a complete checkpoint. Loading checks meta.json (ranks,
ZeRO stage, model config, file sizes) before DeepSpeed reads anything, so a truncated or mismatched
checkpoint fails with a message that says what to do.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadalle.cli import CommandError
from megadalle.config import CheckpointConfig, Config
from megadalle.distributed import engine as dist_engine

TAG_RE = re.compile(r"^step_(\d{8,})$")
TMP_PREFIX = ".tmp-"
LATEST = "latest"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"


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
        tag = latest.read_text(encoding="utf-8").strip()
        target = path / tag
        if not (target / META).is_file():
            raise CheckpointError(f"{latest} points to {tag!r}, which is missing or incomplete; "
                                  f"pass one of the complete checkpoints in {path} explicitly")
        return target
    complete = sorted((p for p in path.glob("step_*") if (p / META).is_file()), key=lambda p: p.name)
    if complete:
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
    try:
        # Our own files hold numpy RNG states and plain Python objects.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is corrupt, "
                              f"resume from an earlier one with checkpoint.resume=<folder>") from None


class CheckpointManager:
    """Owns one checkpoints folder. Every rank constructs one; rank 0 does the renames."""

    def __init__(self, folder: str | Path, cfg: CheckpointConfig, rank: int = 0, world: int = 1) -> None:
        self.folder = Path(folder)
        self.cfg = cfg
        self.rank = rank
        self.world = world

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
        if not (self.folder / LATEST).is_file():
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

    # ---- save ----
    def save(self, engine: Any, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any],
             config: Config) -> Path:
        """Write checkpoint `step` from every rank and publish it; returns its folder."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp = self.folder / tmp_tag
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        dist_engine.barrier()
        engine.save_checkpoint(str(self.folder), tag=tmp_tag, save_latest=False)
        torch.save(rank_state, tmp / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            config.save(tmp / "config.yaml")
        dist_engine.barrier()
        if self.rank == 0:
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
            self._prune()
        dist_engine.barrier()
        return self.folder / tag

    def _prune(self) -> None:
        ckpts = self.checkpoints()
        keep = {s for s, _ in ckpts[-self.cfg.keep_last:]}
        if self.cfg.keep_every:
            keep |= {s for s, _ in ckpts if s % self.cfg.keep_every == 0}
        for s, p in ckpts:
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ---- load ----
    def check_compatible(self, ckpt: Path, config: Config, model_sections: tuple[str, ...], zero_stage: int) -> dict:
        meta = read_meta(ckpt)
        verify_files(ckpt, meta)
        if meta.get("world_size") != self.world:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks and this run has {self.world}; "
                f"the data position and RNG states are per rank, so resume with {meta.get('world_size')} ranks "
                f"(or start from its weights: megadalle convert zero-to-safetensors)")
        if meta.get("zero_stage") != zero_stage:
            raise CheckpointError(
                f"checkpoint {ckpt} was written with distributed.zero_stage={meta.get('zero_stage')} and this run "
                f"uses {zero_stage}; resume with --distributed.zero_stage={meta.get('zero_stage')}")
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

    def load(self, engine: Any, ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load DeepSpeed state into `engine`; returns (trainer_state, this rank's state)."""
        rank_file = ckpt / f"rank_{self.rank:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no state for rank {self.rank} ({rank_file.name})")
        trainer_state = load_torch(ckpt / TRAINER_STATE)
        rank_state = load_torch(rank_file)
        try:
            path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types for unreadable files
            raise CheckpointError(f"DeepSpeed could not load {ckpt} ({type(e).__name__}: {e}); the checkpoint "
                                  f"is corrupt or from another model; resume from an earlier one with "
                                  f"checkpoint.resume=<folder>") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {ckpt}; the checkpoint is incomplete")
        return trainer_state, rank_state
