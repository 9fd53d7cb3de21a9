"""A small residual model and a resumable synthetic stream for testing the Trainer base.

Used in-process by the tests and as a script for real multi-process runs:

    deepspeed --num_gpus 2 tests/trainer_toy.py --run_dir DIR --runs zero0,zero1 --steps 10

The model has the same hooks as the transformer (`resblocks`, `resblock_runner`, an embedding
excluded from weight decay, dropout drawing from the RNG), so loop, checkpointing and resume are
tested without depending on another part of the project.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megadalle.config import Config, load_config  # noqa: E402
from megadalle.training.striped_stream import StripedPosition  # noqa: E402
from megadalle.training.trainer import Trainer  # noqa: E402

VOCAB = 32
SEQ = 8


class Block(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class ToyModel(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.resblocks = nn.ModuleList(Block(dim, dropout) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)
        self.resblock_runner = lambda block, x: x + block.branch(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (batch, seq, dim)
        for block in self.resblocks:
            h = self.resblock_runner(block, h)
        return self.head(h).float()  # (batch, seq, vocab) logits in fp32


class ToyStream(StripedPosition):
    """Deterministic samples; global sample i goes to rank i % world; resumable by position (global:
    another number of ranks may continue it)."""

    def __init__(self, batch: int, rank: int, world: int, seed: int = 0) -> None:
        self.batch, self.rank, self.world, self.seed = batch, rank, world, seed
        self.position = 0  # batches this rank has handed out

    def _sample(self, i: int) -> np.ndarray:
        return np.random.default_rng((self.seed, i)).integers(0, VOCAB, SEQ)

    def __iter__(self):
        while True:
            first = self.position * self.batch * self.world
            idx = [first + j * self.world + self.rank for j in range(self.batch)]
            x = torch.from_numpy(np.stack([self._sample(i) for i in idx]))
            self.position += 1
            yield {"x": x, "y": (x * 3 + 1) % VOCAB}



class ToyTrainer(Trainer):
    model_sections = ()
    export_name = "toy"

    def __init__(self, cfg: Config, dropout: float = 0.1, step_delay: float = 0.0, **kw: Any) -> None:
        super().__init__(cfg, section="train", stage="toy", **kw)
        self.dropout = dropout
        self.step_delay = step_delay

    def build_model(self) -> nn.Module:
        return ToyModel(dropout=self.dropout)

    def build_data(self) -> ToyStream:
        return ToyStream(self.tcfg.micro_batch_size, self.rank, self.world, self.tcfg.seed)

    def build_val_data(self):
        stream = ToyStream(self.tcfg.micro_batch_size, self.rank, self.world, seed=12345)
        return stream

    def compute_loss(self, model, batch):
        if self.step_delay:
            time.sleep(self.step_delay)
        logits = model(batch["x"].to(self.engine.device))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch["y"].to(logits.device).reshape(-1))
        return loss, {"first_token_loss": F.cross_entropy(logits[:, 0], batch["y"][:, 0].to(logits.device))}

    def tokens_in_batch(self, batch) -> int:
        return batch["x"].numel()


def toy_config(run_dir: str | Path, **overrides: Any) -> Config:
    base = {"logging.run_dir": str(run_dir), "logging.progress": False, "logging.tensorboard": False,
            "precision.mode": "fp32", "train.steps": 6, "train.micro_batch_size": 4, "train.log_every": 1,
            "train.ema_every": 2, "train.schedule.kind": "constant", "train.schedule.warmup_steps": 2,
            "train.optimizer.lr": 1e-2, "checkpoint.every_steps": 3}
    base.update(overrides)
    return load_config("tiny", None, base)


def losses(run_dir: str | Path, stage: str = "toy") -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last record of a step wins: a resumed run rewrites it)."""
    from megadalle.training.metrics import read_jsonl

    out = {}
    for rec in read_jsonl(Path(run_dir) / stage / "metrics.jsonl"):
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


RUNS = {
    "zero0": {"distributed.zero_stage": 0},
    "zero1": {"distributed.zero_stage": 1},
    "zero2": {"distributed.zero_stage": 2},
    "zero3": {"distributed.zero_stage": 3},
    "zero3_ckpt": {"distributed.zero_stage": 3, "distributed.activation_checkpointing": True},
    "zero2_bf16": {"distributed.zero_stage": 2, "precision.mode": "bf16"},
    # The paper's scheme on 4 processes as 2 machines x 2 ranks (distributed/replicas.py).
    "paper": {"distributed.zero_stage": 3, "distributed.scheme": "paper", "distributed.gpus_per_node": 2},
    "paper_bf16": {"distributed.zero_stage": 3, "distributed.scheme": "paper", "distributed.gpus_per_node": 2,
                   "precision.mode": "bf16"},
    "zero3_bf16": {"distributed.zero_stage": 3, "precision.mode": "bf16"},
    "paper_fp16rb": {"distributed.zero_stage": 3, "distributed.scheme": "paper", "distributed.gpus_per_node": 2,
                     "precision.mode": "fp16_per_resblock"},
    "zero3_fp16rb": {"distributed.zero_stage": 3, "precision.mode": "fp16_per_resblock"},
    # The same with PowerSGD on the partitions between the machines (distributed/partition_powersgd.py).
    "paper_psgd": {"distributed.zero_stage": 3, "distributed.scheme": "paper", "distributed.gpus_per_node": 2,
                   "distributed.powersgd.enabled": True, "distributed.powersgd.error_dtype": "fp32"},
    "paper_psgd_bf16": {"distributed.zero_stage": 3, "distributed.scheme": "paper", "distributed.gpus_per_node": 2,
                        "precision.mode": "bf16", "distributed.powersgd.enabled": True,
                        "distributed.powersgd.error_dtype": "fp32"},
    "zero1_psgd": {"distributed.zero_stage": 1, "distributed.gpus_per_node": 2, "distributed.powersgd.enabled": True},
    # The paper's 16-bit state: bf16 weights, gradients, Adam moments and error buffers.
    "paper_psgd16": {"distributed.zero_stage": 3, "distributed.scheme": "paper", "distributed.gpus_per_node": 2,
                     "precision.mode": "bf16", "precision.bf16_state": True, "distributed.powersgd.enabled": True},
}


CAPTION_WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "of", "a", "the", "small"]


def write_token_run(root: str | Path, n_train: int = 40, n_val: int = 12, bad: tuple[int, ...] = ()) -> Path:
    """A run folder as `megadalle encode` and `megadalle tokenizer` leave it (tiny geometry): token
    shards of 16 samples under tokens/{train,val}, tokenizer.json. Training samples whose index
    is in `bad` get 100 codes instead of 144 (skipped by the loader as bad_codes)."""
    from megadalle.data.shards import TokenShardWriter
    from megadalle.data.tokenizer import TextTokenizer

    root = Path(root)
    rng = np.random.default_rng(0)
    captions = []
    for split, n in (("train", n_train), ("val", n_val)):
        with TokenShardWriter(root / "tokens" / split, max_samples=16) as w:
            for i in range(n):
                cap = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(3, 8))))
                captions.append(cap)
                size = 100 if split == "train" and i in bad else 144  # 12x12 grid
                w.write_codes(f"{split}{i:04d}", rng.integers(0, 512, size), cap)
    TextTokenizer.train(captions, vocab_size=300, text_len=32, min_frequency=1).save(root / "tokenizer.json")
    return root


def step_keys(stage_dir: str | Path) -> dict[int, set[str]]:
    """step -> the sample keys every rank used in it (from --log_keys; a resumed run rewrites a step)."""
    out: dict[int, set[str]] = {}
    for f in sorted(Path(stage_dir).glob("keys-rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], set()).update(rec["keys"])
    return out


def transformer_config(run_dir: str | Path, world: int, **overrides: Any) -> Config:
    """Tiny preset on synthetic tokens; the global batch is 4 whatever the number of ranks."""
    base = {"logging.run_dir": str(run_dir), "logging.progress": False, "logging.tensorboard": False,
            "precision.mode": "fp32", "train.synthetic_data": True, "train.steps": 10,
            "train.micro_batch_size": 4 // world, "train.log_every": 1, "train.ema_every": 2,
            "train.schedule.warmup_steps": 2, "train.optimizer.lr": 1e-3, "checkpoint.every_steps": 5,
            "tokenizer.bpe_dropout": 0.0}
    base.update(overrides)
    return load_config("tiny", None, base)


def pattern_tokens(tcfg, batch: int, rank: int, world: int, seed: int):
    """SyntheticTokens whose image codes follow a fixed random successor table from the first text
    token, with 10% noise: learnable down to the noise's floor, so that compressed and uncompressed
    runs can be compared where both have learned (test_paper_powersgd.py)."""
    from megadalle.training.transformer_trainer import SyntheticTokens

    V = tcfg.image_vocab_size
    table = np.random.default_rng(1234).permutation(V)

    class Pattern(SyntheticTokens):
        def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
            text, noise = super()._sample(i)
            keep = np.random.default_rng((self.seed, i, 1)).random(self.t.image_len) >= 0.1
            codes = np.empty(self.t.image_len, dtype=np.int64)
            prev = int(text[0]) % V
            for j in range(self.t.image_len):
                prev = codes[j] = table[prev] if keep[j] else noise[j]
            return text, codes

    return Pattern(tcfg, batch, rank, world, seed)


def make_transformer_trainer(cfg: Config, step_delay: float = 0.0, pattern: bool = False, nan_step: int = 0,
                             deepspeed_config: dict | None = None, log_keys: bool = False):
    from megadalle.training.transformer_trainer import TransformerTrainer

    class Slowed(TransformerTrainer):
        calls = 0  # optimizer steps taken by this process

        def train_step(self, batches):
            # nan_step: the last rank's loss turns NaN on that step; the states around it are kept.
            self.calls += 1
            before = state_snapshot(self) if self.calls == nan_step else None
            out = super().train_step(batches)
            if before is not None:
                after = state_snapshot(self)
                self.nan_report = {k: bool(torch.equal(before[k], after[k])) for k in before}
                self.nan_report["applied"] = out["_applied"]
            return out

        def build_data(self):
            if not pattern:
                return super().build_data()
            return pattern_tokens(self.cfg.transformer, self.tcfg.micro_batch_size, self.rank, self.world,
                                  self.tcfg.seed)

        # A pause per micro-batch so that a test can kill the run mid-training.
        def compute_loss(self, model, batch):
            if step_delay:
                time.sleep(step_delay)
            loss, metrics = super().compute_loss(model, batch)
            if log_keys:  # which samples each step used, per rank (elastic resume tests)
                with open(self.folder / f"keys-rank{self.rank}.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step + 1, "keys": list(batch["key"])}) + "\n")
            if nan_step and self.calls == nan_step and self.rank == self.world - 1:
                loss = loss * float("nan")
            return loss, metrics

    return Slowed(cfg, deepspeed_config=deepspeed_config)


def state_snapshot(trainer) -> dict[str, torch.Tensor]:
    """Copies of what a skipped step must leave alone: this rank's weight partitions, the master
    copy, Adam's moments and the PowerSGD error buffers (ZeRO-3)."""
    opt = trainer.engine.optimizer
    moments = [v for s in opt.optimizer.state.values() for k, v in sorted(s.items()) if k.startswith("exp_avg")]
    hook = next(h for h in trainer.gradient_hook.hooks if hasattr(h, "error"))
    return {"weights": torch.cat([t.reshape(-1).float() for t in opt.fp16_partitioned_groups_flat]),
            "master": torch.cat([t.reshape(-1).float() for t in opt.fp32_partitioned_groups_flat]),
            "moments": torch.cat([t.reshape(-1).float() for t in moments]) if moments else torch.zeros(0),
            "error": hook.error.float().clone()}


def resident_state_bytes(trainer) -> dict[str, int]:
    """Bytes of the tensors DeepSpeed's ZeRO-3 optimizer and the gradient hook keep on this rank,
    each storage counted once."""
    opt = trainer.engine.optimizer
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    hooks = getattr(trainer.gradient_hook, "hooks", [])
    hook = next((h for h in hooks if hasattr(h, "error")), None)
    return {"weights": size(opt.fp16_partitioned_groups_flat), "master": size(opt.fp32_partitioned_groups_flat),
            "grads": size([opt.grad_partitions_flat_buffer]),
            "moments": size([v for s in opt.optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v) and v.dim() > 0]),
            "error": size([hook.error]) if hook is not None else 0}


def probe_batch(cfg: Config) -> dict[str, torch.Tensor]:
    from megadalle.training.transformer_trainer import SyntheticTokens

    return next(iter(SyntheticTokens(cfg.transformer, 2, 0, 1, seed=999)))


@torch.no_grad()
def probe_logits(trainer) -> dict[str, torch.Tensor]:
    """The trained engine's logits on a fixed batch (every rank calls: ZeRO-3 gathers)."""
    batch = probe_batch(trainer.cfg)
    trainer.engine.eval()
    text_logits, image_logits = trainer.engine(batch["text"].to(trainer.engine.device),
                                               batch["codes"].to(trainer.engine.device))
    trainer.engine.train()
    return {**batch, "text_logits": text_logits.float().cpu(), "image_logits": image_logits.float().cpu()}


def _deepspeed_comms() -> dict[str, dict[str, int]]:
    """DeepSpeed's comms logger: per collective, calls and bytes (every ZeRO-3 collective of this rank)."""
    from deepspeed.comm import comm as ds_comm

    out = {}
    for op, sizes in ds_comm.comms_logger.comms_dict.items():
        out[op] = {"calls": sum(v[0] for v in sizes.values()), "bytes": sum(int(m) * v[0] for m, v in sizes.items())}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run_dir", required=True)
    p.add_argument("--runs", default="zero0", help="comma list of RUNS names, each in its own sub-folder")
    p.add_argument("--model", default="toy", choices=["toy", "transformer"])
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--step_delay", type=float, default=0.0)
    p.add_argument("--pattern", action="store_true", help="transformer: learnable pattern tokens")
    p.add_argument("--nan_step", type=int, default=0, help="transformer: the last rank's loss is NaN on this step")
    p.add_argument("--comms", action="store_true", help="transformer: DeepSpeed's comms logger on")
    p.add_argument("--log_keys", action="store_true", help="transformer: write each step's sample keys per rank")
    p.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value")
    a = p.parse_args()
    import yaml

    from megadalle.distributed.launch import discover

    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.overrides)}
    world = discover().world_size
    for name in a.runs.split(","):
        run_dir = Path(a.run_dir) / name
        if a.model == "toy":
            trainer = ToyTrainer(toy_config(run_dir, **{**RUNS[name], **extra}), dropout=a.dropout,
                                 step_delay=a.step_delay)
        else:
            trainer = make_transformer_trainer(transformer_config(run_dir, world, **{**RUNS[name], **extra}),
                                               a.step_delay, a.pattern, a.nan_step,
                                               {"comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}
                                               if a.comms else None, a.log_keys)
        if a.comms:  # DeepSpeed's logger counts for the whole process: each run counts its own
            from deepspeed.comm import comm as ds_comm

            ds_comm.comms_logger.comms_dict.clear()
        summary = trainer.train()
        probe = probe_logits(trainer) if a.model == "transformer" else None
        if trainer.cfg.distributed.scheme == "paper" or (a.comms and trainer.cfg.distributed.zero_stage == 3):
            import torch.distributed as dist  # every rank says which group ZeRO shards over, and what it holds

            opt = trainer.engine.optimizer
            hook = trainer.gradient_hook
            (run_dir / f"scheme-rank{trainer.rank}.json").write_text(json.dumps({
                "rank": trainer.rank, "zero_group": dist.get_process_group_ranks(opt.dp_process_group),
                "partition_numel": opt.grad_partitions_flat_buffer.numel(),
                "model_numel": sum(p.ds_numel for p in trainer.engine.module.parameters()),
                "state_bytes": resident_state_bytes(trainer), "nan_report": getattr(trainer, "nan_report", None),
                "comms": _deepspeed_comms() if a.comms else None, "steps": trainer.step,
                **(hook.metrics() if hook is not None else {})}))
        if trainer.is_main:
            if probe is not None:
                torch.save(probe, run_dir / "probe.pt")
            print(json.dumps({"run": name, "final_step": summary.final_step}), flush=True)


if __name__ == "__main__":
    main()
    from megadalle.distributed.engine import exit_process

    exit_process(0)  # as the megadalle program leaves (C++ teardown under load could abort it)
