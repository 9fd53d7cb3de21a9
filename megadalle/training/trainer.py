"""Trainer base: one training loop on DeepSpeed for every stage (dVAE, transformer, reranker).

Construction: `Trainer(cfg, section="train", stage="transformer")` picks which `TrainConfig`
(`dvae_train`, `train`, `clip_train`) drives the loop and the sub-folder of `logging.run_dir` that
receives `checkpoints/`, `tb/`, `samples/`, `metrics.jsonl` and the EMA export.

Subclasses override:

    build_model() -> nn.Module               the plain model (built with the same seed on every rank)
    prepare_model(model)                     runner wrappers / gradient hook, before activation
                                             checkpointing wraps the runner and DeepSpeed wraps the model
    build_data() -> loader                   an iterable of batches with state_dict()/load_state_dict()
                                             that resumes exactly where it stopped (per rank)
    build_val_data() -> iterable | None      validation batches (restarted at every evaluation)
    compute_loss(model, batch) -> (loss, metrics)
                                             `model` is the DeepSpeed engine: call `model(...)` (its
                                             forward) so that ZeRO-3 gathers parameters; metrics is a
                                             dict of floats or 0-d tensors (e.g. text_loss, image_loss)
    evaluate() -> dict                       default: mean compute_loss over `eval_batches` val batches
    write_samples(step) -> list[Path]        sample grids from the EMA weights (`self.ema_model()`)
    tokens_in_batch(batch) -> int            for tokens/s (default: 0, not logged)
    train_flops(batch) -> float | None       forward+backward FLOPs of a batch, for MFU
    extra_state() / load_extra_state(d)      anything else a checkpoint must carry
    export_name / export_config()            the EMA export: <stage>/<export_name>.safetensors + .yaml
    model_sections                           config sections that define the model (checked on resume)
    export_settings(exported)                the dotted settings an export's yaml stands for (messages)
    check_init_source(weights)               what else must fit exported weights (e.g. the tokenizer)

The loop (`train()`), per step: `grad_accum_steps` micro-batches of forward + `engine.backward`,
then the optional `gradient_hook.after_backward(model) -> bool` (contract in docs/DESIGN.md; False
on any rank skips the step everywhere: parameters, optimizer moments, LR schedule and EMA
untouched), then `engine.step()` with the lr of the schedule. After the step: metrics every
`log_every` steps (loss per modality, lr, grad norm, tokens/s, MFU, peak memory, skipped steps),
evaluation every `eval_every` steps (feeding the plateau schedule), EMA every `ema_every` applied
updates, samples every `sample_every` steps, checkpoints every `checkpoint.every_steps` steps and
at the end. A run resumes from the latest checkpoint of its folder by default
(`checkpoint.resume`), restoring model, optimizer, schedule, EMA, data position and every rank's
RNG states, so that on CPU the resumed run's losses equal an uninterrupted run's bit for bit.
A new run (nothing to resume) with `checkpoint.init_from` starts from exported weights instead of
the initialisation (fine-tuning; training/init_weights.py).
"""

from __future__ import annotations

import math
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from megadalle.config import Config, ConfigError, TrainConfig
from megadalle.errors import CommandError
from megadalle.distributed import engine as dist
from megadalle.distributed import universal as dist_universal
from megadalle.run_layout import RunLayout
from megadalle.distributed.watchdog import TrainingGuard
from megadalle.training import elastic
from megadalle.training.checkpoint import CheckpointError, CheckpointManager, load_torch, rng_state, set_rng_state
from megadalle.training.ema import EMA
from megadalle.training.metrics import Metrics
from megadalle.training.run_lock import RunLock
from megadalle.training.schedules import LRSchedule


@dataclass
class TrainSummary:
    steps_run: int = 0
    final_step: int = 0
    resumed_from: str = ""
    started_from: str = ""  # checkpoint.init_from: the weights file a fine-tune started from
    skipped_steps: int = 0
    last_loss: float = math.nan
    last_val_loss: float = math.nan
    written: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"trained to step {self.final_step} ({self.steps_run} steps this run"
                 + (f", resumed from {self.resumed_from}" if self.resumed_from else "")
                 + (f", started from the weights in {self.started_from}" if self.started_from else "")
                 + f", {self.skipped_steps} skipped); last loss {self.last_loss:.4f}"
                 + ("" if math.isnan(self.last_val_loss) else f", last val loss {self.last_val_loss:.4f}")]
        lines += [f"  {what}: {where}" for what, where in self.written.items()]
        return "\n".join(lines)


def _has_no_rows(batch: Any) -> bool:
    """A loader's batch (dict with "key") with no sample in it."""
    return isinstance(batch, dict) and "key" in batch and len(batch["key"]) == 0


def _scalar(v: Any) -> float:
    return float(v.detach().float().item()) if torch.is_tensor(v) else float(v)


class Trainer:
    model_sections: tuple[str, ...] = ()
    export_name: str = "model"

    def __init__(self, cfg: Config, section: str = "train", stage: str = "model",
                 deepspeed_config: str | dict | None = None, gradient_hook: Any = None) -> None:
        if section not in ("train", "dvae_train", "clip_train"):
            raise ConfigError(f"unknown training section {section!r}; use train, dvae_train or clip_train")
        self.cfg = cfg
        self.section = section
        self.tcfg: TrainConfig = getattr(cfg, section)
        self.stage = stage
        self.layout = RunLayout.from_config(cfg)
        self.folder = self.layout.stage(stage)
        self.deepspeed_config = deepspeed_config
        self.gradient_hook = gradient_hook
        self.step = 0  # completed loop steps (applied or skipped)
        self.updates = 0  # applied optimizer updates
        self.skipped = 0
        self.engine: Any = None
        self.lock = RunLock(self.folder)
        self._set_up = False

    # ------------------------------------------------------------------ hooks
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_data(self) -> Any:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> None:
        """Wrap the model's resblock runner or install a `self.gradient_hook` (before DeepSpeed)."""

    def build_val_data(self) -> Iterable | None:
        return None

    def compute_loss(self, model: Any, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def write_samples(self, step: int) -> list[Path]:
        return []

    def tokens_in_batch(self, batch: Any) -> int:
        return 0

    def train_flops(self, batch: Any) -> float | None:
        return None

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def export_config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def export_settings(self, exported: dict[str, Any]) -> dict[str, Any]:
        """The dotted settings (and preset) that an export's yaml, in the format export_config()
        writes, stands for: {"preset": "tiny", "transformer.dim": 128, ...}. Default: a whole config."""
        out = {"preset": exported["preset"]} if exported.get("preset") else {}
        for section in self.model_sections:
            if isinstance(exported.get(section), dict):
                out.update({f"{section}.{k}": v for k, v in exported[section].items()})
        return out

    def check_init_source(self, weights: Path) -> None:
        """Raise a CommandError when what else this run uses does not fit the weights it starts from."""

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        self.engine.eval()
        sums: dict[str, float] = {}
        n = 0
        for batch in self.val_data:
            if n >= self.tcfg.eval_batches:
                break
            loss, metrics = self.compute_loss(self.engine, batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + _scalar(v)
            n += 1
        self.engine.train()
        # Ranks with fewer val batches still take part with zeros, weighted by their count.
        gathered = dist.all_gather_object((n, sums))
        total = sum(c for c, _ in gathered)
        if total == 0:
            return {}
        keys = sorted({k for _, s in gathered for k in s})
        return {f"val_{k}": sum(s.get(k, 0.0) for _, s in gathered) / total for k in keys}

    # ------------------------------------------------------------------ set-up
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        if self._set_up:
            return
        env = dist.init_distributed(self.cfg.distributed)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.local_rank = env.local_rank
        self._lock_run_folder()
        try:
            self._build_and_resume()
        except BaseException:
            self.lock.release()
            raise
        self._set_up = True

    def _lock_run_folder(self) -> None:
        """Rank 0 takes the stage folder's lock; every rank stops with its message if it cannot."""
        error = ""
        if self.is_main:
            try:
                self.lock.acquire()
            except CommandError as e:
                error = str(e)
        # One id for this run's temporary save folders, the same on every rank.
        error, self.run_id = dist.broadcast_object((error, uuid.uuid4().hex[:12]))
        if error:
            raise CommandError(error)

    def _build_and_resume(self) -> None:
        self.global_batch = self.tcfg.global_batch(self.world)
        self.ckpt = CheckpointManager(self.folder / "checkpoints", self.cfg.checkpoint, self.rank, self.world,
                                      self.run_id)
        if self.is_main and self.lock.held:
            self.ckpt.remove_stale_temps()
        # Known before the model is built: a run with nothing to resume may start from exported weights.
        target = self.ckpt.resume_target(self.cfg.checkpoint.resume)
        # Every rank must resume the same checkpoint (rank 0's view of the shared folder decides).
        target_name = dist.broadcast_object(str(target) if target else "")
        # Written by another number of ranks or at another ZeRO stage: DeepSpeed must be built to load
        # the universal checkpoint that resume() converts it to (training/elastic.py).
        universal = bool(target_name) and elastic.needs_universal(Path(target_name), self.world,
                                                                  self.cfg.distributed.zero_stage)
        # Same init on every rank (ZeRO-3 partitions what each rank built), then per-rank streams.
        self._seed(self.tcfg.seed)
        model = self.build_model()
        self.started_from = self._start_from_weights(model, resuming=bool(target_name))
        model = model.to(dist.local_device())
        self.model = model
        # Per-resblock fp16 scaling and subclass runner wrappers go in first: activation
        # checkpointing wraps their runner.
        self.gradient_hook = dist.install_precision(model, self.cfg, self.gradient_hook)
        self.prepare_model(model)
        if self.cfg.distributed.activation_checkpointing and hasattr(model, "resblocks"):
            dist.install_activation_checkpointing(model, self.cfg.distributed.checkpoint_every_k,
                                                  self.cfg.distributed.checkpoint_impl)
        elif self.cfg.distributed.activation_checkpointing and self.is_main:
            # One distributed section serves every stage (the 12b preset turns it on for the
            # transformer); the dVAE and the reranker have no resblocks to recompute.
            print(f"note: distributed.activation_checkpointing recomputes resblocks; the {self.stage} model has "
                  f"none and trains without it")
        self.engine = dist.build_engine(model, self.cfg, self.tcfg, self.deepspeed_config, self.section,
                                        load_universal=universal)
        if self.cfg.distributed.scheme == "paper":  # machines average (or compress) their ZeRO-3 partitions
            from megadalle.distributed import replicas

            hook = replicas.attach(self.engine, self.cfg)
            if self.is_main and hasattr(hook, "describe"):
                print(hook.describe())
            self.gradient_hook = dist.HookChain(self.gradient_hook, hook)
        elif self.cfg.distributed.powersgd.enabled:  # PowerSGD takes over DeepSpeed's gradient reduction
            from megadalle.distributed import powersgd

            self.gradient_hook = dist.HookChain(self.gradient_hook, powersgd.attach(self.engine, self.cfg))
        self._seed(self.tcfg.seed + 1000 * (self.rank + 1))
        self.data = self.build_data()
        self.val_data = self.build_val_data()
        self.schedule = LRSchedule(self.tcfg.schedule, self.tcfg.optimizer.lr, self.tcfg.steps)
        self.ema = EMA(self.tcfg.ema_decay, self.tcfg.ema_every)
        self.resumed_from = ""
        self.wandb_id = uuid.uuid4().hex[:16]  # a resume replaces it with the checkpoint's
        if target_name:
            self.resume(Path(target_name))
            if self.is_main:  # a rewind: newer checkpoints are set aside, never pruned later
                self.ckpt.set_aside_newer(self.step)
        elif self.ema.enabled:
            self._fold_ema()
        # After the resume: a resumed run logs into the same W&B run, whose id travels in the checkpoint.
        self.metrics = Metrics(self.folder, self.cfg.logging, self.is_main, run_name=self.stage,
                               config=self.cfg.to_dict(), wandb_id=self.wandb_id)
        if self.is_main:
            self.cfg.save(self.folder / "config.yaml")

    def _start_from_weights(self, model: nn.Module, resuming: bool) -> str:
        """checkpoint.init_from: copy exported weights into the plain model, before DeepSpeed wraps
        it (ZeRO-3 then partitions them); returns the weights file, or "" when nothing was loaded."""
        source = self.cfg.checkpoint.init_from
        if not source:
            return ""
        if resuming:
            if self.is_main:
                print(f"note: resuming the checkpoint in {self.ckpt.folder}; --init-from {source} is ignored "
                      f"(it sets the starting weights of a new run only)")
            return ""
        from megadalle.training.init_weights import find_weights, load_weights, settings_hint

        error, path = "", Path()
        try:
            path = find_weights(source, self.stage, self.export_name)
            load_weights(model, path, lambda: settings_hint(path, self.cfg, self.export_settings))
            self.check_init_source(path)
        except (CommandError, ConfigError) as e:
            error = str(e)
        # Every rank reads the files itself; one rank that cannot must stop them all, not leave
        # the others waiting in deepspeed.initialize.
        errors = [e for e in dist.all_gather_object(error) if e]
        if errors:
            raise CommandError(errors[0])
        if self.is_main:
            print(f"starting from the weights in {path} (new optimizer state, schedule and step count)")
        return str(path)

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "updates": self.updates, "skipped": self.skipped, "section": self.section,
                "wandb_id": self.wandb_id,
                "schedule": self.schedule.state_dict(),
                "ema": self._ema_state() if self.is_main and self.ema.enabled else None,
                "extra": self.extra_state(),
                # Lets a converter pair DeepSpeed's per-group fp32 masters with names (ZeRO-0).
                "optimizer_group_names": dist.optimizer_group_names(self.engine)}

    def rank_state(self) -> dict[str, Any]:
        return {"rng": rng_state(), "data": self.data.state_dict(),
                # A sharded EMA: this rank's partition of the average (see _fold_ema).
                "ema": self.ema.state_dict() if self.ema.enabled and self.ema_sharded else None,
                "hook": self.gradient_hook.state_dict() if self.gradient_hook is not None else None}

    def save_checkpoint(self) -> Path:
        return self.ckpt.save(self.engine, self.step, self.trainer_state(), self.rank_state(), self.cfg)

    def resume(self, ckpt: Path) -> None:
        stage = self.cfg.distributed.zero_stage
        meta = self.ckpt.check_compatible(ckpt, self.cfg, self.model_sections, stage, topology_may_change=True)
        change = elastic.describe_change(meta, self.world, stage)
        if change:
            state, mine = self._load_elsewhere(ckpt, meta, change)
        else:
            state, mine = self.ckpt.load(self.engine, ckpt)
        if state.get("section") != self.section:
            raise CheckpointError(f"checkpoint {ckpt} was written by the {state.get('section')} stage, "
                                  f"not {self.section}; point checkpoint.resume at this stage's checkpoints")
        self.step, self.updates, self.skipped = state["step"], state["updates"], state["skipped"]
        if isinstance(state.get("wandb_id"), str) and state["wandb_id"]:  # older checkpoints start a new W&B run
            self.wandb_id = state["wandb_id"]
        self.schedule.load_state_dict(state["schedule"])
        if change:
            self._resume_ema_elsewhere(ckpt, state)
        elif self.ema.enabled and (self.is_main or self.ema_sharded):
            saved = mine.get("ema") if self.ema_sharded else state.get("ema")
            if self.ema_sharded and not saved and (state.get("ema") or {}).get("params"):
                # Written before the EMA was sharded: take this rank's partition of the full average.
                saved = {**state["ema"], "params": dist.partition_like(self.engine, state["ema"]["params"])}
            if not saved or "params" not in saved:
                raise CheckpointError(f"checkpoint {ckpt} has no {'sharded ' if self.ema_sharded else ''}EMA state "
                                      f"for this rank but {self.section}.ema_decay={self.tcfg.ema_decay}; resume with "
                                      f"the ZeRO stage it was written with, or {self.section}.ema_decay=0")
            self.ema.load_state_dict(saved)
        self.load_extra_state(state.get("extra") or {})
        self.data.load_state_dict(mine["data"])
        if self.gradient_hook is not None:
            if mine.get("hook") is None:
                raise CheckpointError(f"checkpoint {ckpt} has no gradient-hook state but this run uses "
                                      f"{type(self.gradient_hook).__name__}; resume with the same settings")
            self.gradient_hook.load_state_dict(mine["hook"])
        if not change:  # RNG states are per rank: another number of ranks keeps its fresh seeds (elastic.py)
            set_rng_state(mine["rng"])
        self.resumed_from = str(ckpt)

    def _load_elsewhere(self, ckpt: Path, meta: dict[str, Any], change: str) -> tuple[dict, dict]:
        """resume() from a checkpoint of another topology: DeepSpeed's universal checkpoint for the
        engine, rank 0's file for the global data position (training/elastic.py)."""
        hooks = self.gradient_hook.hooks if isinstance(self.gradient_hook, dist.HookChain) else [self.gradient_hook]
        stateful = [type(h).__name__ for h in hooks if h is not None and not getattr(h, "elastic", False)]
        problem = elastic.refusal(meta, self.cfg.distributed.zero_stage, stateful,
                                  bool(getattr(self.data, "elastic", False)), ckpt)
        if problem:
            raise CheckpointError(problem)
        universal = None
        if elastic.needs_universal(ckpt, self.world, self.cfg.distributed.zero_stage):
            universal = self.ckpt.folder / f".tmp-universal-{ckpt.name}-{self.run_id}"
            error = ""
            if self.is_main:
                print(f"note: {ckpt} was written by {meta['world_size']} ranks at ZeRO-{meta['zero_stage']} ({change}); "
                      f"converting it to DeepSpeed's universal checkpoint")
                try:
                    dist_universal.convert(ckpt, universal)
                except CommandError as e:
                    error = str(e)
            error = dist.broadcast_object(error)
            if error:
                raise CheckpointError(error)
        hyperparameters = dist_universal.group_hyperparameters(self.engine)
        try:
            state, mine = self.ckpt.load(self.engine, ckpt, universal=universal, rank=0)
        finally:
            dist.barrier()
            if self.is_main and universal is not None:
                shutil.rmtree(universal, ignore_errors=True)
        dist_universal.repair_after_universal_load(self.engine, hyperparameters)
        if self.is_main:
            print(f"resumed {ckpt} on another topology ({change}): model and optimizer through DeepSpeed's "
                  f"universal checkpoint, the global data position, the EMA re-cut; RNG states start afresh")
        return state, mine

    def _resume_ema_elsewhere(self, ckpt: Path, state: dict[str, Any]) -> None:
        """The EMA of a checkpoint of another topology: whole again, then cut for this one."""
        if not self.ema.enabled:
            return
        saved = dict(state.get("ema") or {})
        if saved.get("sharded"):
            shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in self.engine.module.named_parameters()}
            parts = [load_torch(f)["ema"]["params"] for f in elastic.sharded_ema_files(ckpt, shapes)]
            saved["params"] = elastic.rebuild_sharded(parts, shapes)
            saved.pop("sharded")
        if "params" not in saved:
            raise CheckpointError(f"checkpoint {ckpt} has no EMA state but {self.section}.ema_decay="
                                  f"{self.tcfg.ema_decay}; resume with {self.section}.ema_decay=0")
        if self.ema_sharded:
            self.ema.load_state_dict({**saved, "params": dist.partition_like(self.engine, saved["params"])})
        elif self.is_main:
            self.ema.load_state_dict(saved)

    # ------------------------------------------------------------------ EMA
    @property
    def ema_sharded(self) -> bool:
        """Under ZeRO-3 every rank averages its own partition: no full-model gather while training
        (at 12B a gather every 25 updates would move ~49 GB to the CPU); the export gathers once."""
        return dist.partitions_parameters(self.engine)

    @property
    def ema_model_is_collective(self) -> bool:
        """Whether every rank must call ema_model() (gathering is collective)."""
        return self.ema_sharded or not self.ema.enabled

    def _fold_ema(self) -> None:
        if self.ema_sharded:
            self.ema.update(dist.local_fp32_partitions(self.engine), keep=True)
        else:
            self.ema.update(dist.full_fp32_named_parameters(self.engine), keep=self.is_main)

    def _ema_state(self) -> dict[str, Any]:
        """What trainer_state.pt records of the EMA: all of it, or (sharded) all but the partitions."""
        state = self.ema.state_dict()
        if self.ema_sharded:
            state = {k: v for k, v in state.items() if k != "params"}
            state["sharded"] = True
        return state

    def full_ema(self) -> dict[str, torch.Tensor]:
        """The averaged weights as full tensors (collective when sharded; on rank 0 otherwise)."""
        return dist.gather_partitions(self.engine, self.ema.params) if self.ema_sharded else self.ema.params

    def ema_model(self) -> nn.Module:
        """A plain (non-DeepSpeed) model holding the EMA weights on rank 0.

        Call it on every rank: without EMA the current weights are gathered, a collective.
        Other ranks get a freshly initialised model.
        """
        # Building a model draws from the RNG; sampling must not shift the training streams.
        with torch.random.fork_rng(devices=[]):
            model = self.build_model()
        # Same branch on every rank (gathering is collective); only rank 0 holds the EMA.
        state = self.full_ema() if self.ema.enabled else dict(dist.full_fp32_named_parameters(self.engine))
        if not self.is_main:
            return model.eval()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(k in dict(model.named_parameters()) for k in missing):
            raise RuntimeError(f"EMA weights do not fit the model: missing {missing}, unexpected {unexpected}")
        return model.eval()

    def export_weights(self) -> tuple[Path, Path]:
        """EMA (or, without EMA, current) weights as <stage>/<export_name>.safetensors + .yaml."""
        import yaml
        from safetensors.torch import save_file

        # The branch must be the same on every rank: gathering ZeRO shards is collective.
        if self.ema.enabled:
            tensors = {k: v.contiguous() for k, v in self.full_ema().items()}
        else:
            tensors = {k: v.contiguous() for k, v in dist.full_fp32_named_parameters(self.engine)}
        if not self.is_main:
            return Path(), Path()
        out = self.folder / f"{self.export_name}.safetensors"
        tmp = out.with_name(out.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"step": str(self.step), "ema": str(self.ema.enabled)})
        tmp.replace(out)
        cfg_path = self.folder / f"{self.export_name}.yaml"
        cfg_tmp = cfg_path.with_name(cfg_path.name + ".tmp")
        cfg_tmp.write_text(yaml.safe_dump(self.export_config(), sort_keys=False))
        cfg_tmp.replace(cfg_path)
        return out, cfg_path

    # ------------------------------------------------------------------ loop
    def _batches(self) -> Iterator[Any]:
        while True:
            got_any = False
            for batch in self.data:
                got_any = True
                yield batch
            if not got_any:
                raise ConfigError(f"the {self.stage} training data yielded no batch for rank {self.rank}; "
                                  f"check the data source and that it has at least micro_batch_size x ranks samples")

    def train_step(self, batches: Iterator[Any]) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns this rank's metrics,
        averaged over the micro-batches that had rows (`_real`: 1 when there was one)."""
        sums: dict[str, float] = {}
        tokens = 0
        flops: float | None = 0.0
        accum = self.tcfg.grad_accum_steps
        manual_norm = dist.needs_manual_grad_norm(self.engine)
        norm_before: float | None = None
        real = 0
        for micro in range(accum):
            batch = next(batches)
            stand_in = _has_no_rows(batch)
            if stand_in:
                # Every sample of this rank's micro-batch was bad (data/global_order.py drops bad
                # samples rather than take another rank's). ZeRO needs every rank in every
                # forward and backward, so a row of zeros runs with its loss weighed by 0.
                batch = self.data.stand_in()
            dist.start_micro_step(self.engine, last=micro == accum - 1)
            loss, metrics = self.compute_loss(self.engine, batch)
            self.engine.backward(loss * 0.0 if stand_in else loss)
            values = {k: _scalar(v) for k, v in {"loss": loss, **metrics}.items()}
            if stand_in:
                for k in values:
                    sums.setdefault(k, 0.0)
                continue
            real += 1
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            tokens += self.tokens_in_batch(batch)
            f = self.train_flops(batch)
            flops = None if f is None or flops is None else flops + f
        sums = {k: v / max(real, 1) for k, v in sums.items()}
        ok = True
        if self.gradient_hook is not None:
            ok = dist.call_hook(self.gradient_hook, self.engine.module)
        if ok:
            dist.set_lr(self.engine, self.schedule.lr(self.updates))
            if manual_norm:
                norm_before = dist.grad_norm_of_module(self.engine.module)
            self.engine.step()
            ok = dist.step_was_applied(self.engine)
        else:
            dist.skip_step(self.engine)
        if ok:
            self.updates += 1
            norm = dist.grad_norm(self.engine, norm_before)
            if norm is not None:
                sums["grad_norm"] = norm
        else:
            self.skipped += 1
        sums["_tokens"] = float(tokens)
        sums["_flops"] = math.nan if flops is None else float(flops)
        sums["_applied"] = 1.0 if ok else 0.0
        sums["_real"] = 1.0 if real else 0.0
        return sums

    def train(self) -> TrainSummary:
        self.setup()
        try:
            return self._train()
        finally:
            self.lock.release()

    def close(self) -> None:
        """Release the run folder (train() does this itself; for trainers only set up)."""
        self.lock.release()

    def _train(self) -> TrainSummary:
        summary = TrainSummary(resumed_from=self.resumed_from, started_from=self.started_from)
        start = self.step
        total = self.tcfg.steps
        batches = self._batches()
        progress = None
        if self.is_main and self.cfg.logging.progress:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=start, desc=f"train {self.stage}", dynamic_ncols=True)
            self.metrics.printer = progress.write
        dtype = dist.param_dtype(self.engine)
        peak = dist.device_peak_flops(dtype)
        window_t0 = time.perf_counter()
        window: dict[str, float] = {}
        last_saved = self.step if self.resumed_from else -1
        self.engine.train()
        # [cluster] SIGUSR1/SIGTERM/deadline -> stop after a step all ranks agree on, save, exit 75;
        # a dead peer -> exit 76 (megadalle/distributed/watchdog.py, slurm/common.sh).
        guard = TrainingGuard(self.cfg.distributed).start()
        while self.step < total:
            step_metrics = self.train_step(batches)
            self.step += 1
            real = step_metrics["_real"]  # 0: this rank's samples of the step were all bad
            for k, v in step_metrics.items():  # every key on every rank: they are averaged together
                window[k] = window.get(k, 0.0) + (v if k.startswith("_") or real else 0.0)
            window["_steps"] = window.get("_steps", 0.0) + real
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{step_metrics['loss']:.4f}")
            if real:
                summary.last_loss = step_metrics["loss"]
            if self.ema.enabled and step_metrics["_applied"] and self.ema.due(self.updates):
                self._fold_ema()
            logs: dict[str, float] = {}
            if self.tcfg.eval_every and self.step % self.tcfg.eval_every == 0:
                val = self.evaluate()
                logs.update(val)
                if "val_loss" in val:
                    summary.last_val_loss = val["val_loss"]
                    if self.schedule.observe(val["val_loss"]) and progress is not None:
                        progress.write(f"step {self.step}: validation loss plateaued; lr decayed "
                                       f"({self.schedule.decays} of {self.tcfg.schedule.max_decays})")
            if self.step % self.tcfg.log_every == 0 or self.step == total:
                logs.update(self._window_metrics(window, time.perf_counter() - window_t0, peak))
                window, window_t0 = {}, time.perf_counter()
            if logs:
                self.metrics.log(self.step, logs)
                if hasattr(self.gradient_hook, "metrics"):  # e.g. per-resblock scales (paper fig. 12)
                    self.metrics.log(self.step, self.gradient_hook.metrics(), console=False)
            if self.tcfg.sample_every and self.step % self.tcfg.sample_every == 0:
                self.write_samples(self.step)
            if self.step % self.cfg.checkpoint.every_steps == 0 or self.step == total:
                self.save_checkpoint()
                last_saved = self.step
            if guard.should_stop():  # [cluster]
                break
        if last_saved != self.step:
            self.save_checkpoint()
        guard.finish(f"checkpoint of step {self.step} in {self.ckpt.folder}")  # [cluster]
        if progress is not None:
            progress.close()
        summary.steps_run = self.step - start
        summary.final_step = self.step
        summary.skipped_steps = self.skipped
        exported = self.export_weights()
        if self.is_main:
            summary.written = {"checkpoints": str(self.ckpt.folder) + f" (latest {self.ckpt.latest().name})",
                               "weights (EMA)" if self.ema.enabled else "weights": str(exported[0]),
                               "metrics": str(self.metrics.jsonl_path)}
            if self.cfg.logging.tensorboard:
                summary.written["tensorboard"] = str(self.folder / "tb")
            if self.tcfg.sample_every:
                summary.written["samples"] = str(self.folder / "samples")
        self.metrics.close()
        return summary

    def _window_metrics(self, window: dict[str, float], seconds: float, peak: float | None) -> dict[str, float]:
        # Sums and step counts go across ranks, so that a rank with fewer counted steps (all its
        # samples bad, see train_step) weighs less; with equal counts this is the plain mean.
        local = {k: v for k, v in window.items() if not k.startswith("_") and k != "grad_norm"}
        local["_steps"] = window.get("_steps", 0.0)
        # Every rank reports its tokens and FLOPs; throughput is the sum over ranks.
        local["_tokens"] = window.get("_tokens", 0.0)
        local["_flops"] = window.get("_flops", 0.0)
        avg = dist.mean_across_ranks(local)
        steps = avg.pop("_steps")
        avg = {k: (v if k.startswith("_") else v / steps if steps else math.nan) for k, v in avg.items()}
        out = {k: v for k, v in avg.items() if not k.startswith("_")}
        applied = window.get("_applied", 0.0)
        if applied and "grad_norm" in window:
            out["grad_norm"] = window["grad_norm"] / applied
        out["lr"] = self.schedule.lr(max(0, self.updates - 1))
        out["skipped_steps"] = float(self.skipped)
        out["peak_memory_gb"] = dist.peak_memory_bytes() / 2**30
        if seconds > 0:
            if avg["_tokens"] > 0:
                out["tokens_per_s"] = avg["_tokens"] * self.world / seconds
            flops = avg["_flops"]
            if math.isfinite(flops) and flops > 0:
                out["tflops_per_rank"] = flops / seconds / 1e12
                if peak:
                    out["mfu"] = flops / seconds / peak
        return out
