"""Trainer base in one process: loop, exact resume, gradient hook, activation checkpointing,
schedules, EMA, weight-decay groups. Real DeepSpeed engines on a 1-rank gloo group."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from megadalle.config import ScheduleConfig
from megadalle.distributed.engine import install_activation_checkpointing, weight_decay_groups
from megadalle.training.ema import EMA
from megadalle.training.schedules import LRSchedule
from trainer_toy import VOCAB, ToyModel, ToyTrainer, losses, toy_config


def test_resume_continues_bit_identically(tmp_path):
    full = ToyTrainer(toy_config(tmp_path / "full"), dropout=0.1)
    s = full.train()
    assert s.final_step == 6 and s.steps_run == 6
    # Same run, stopped after step 3 and resumed by a fresh trainer (the default: resume=latest).
    first = ToyTrainer(toy_config(tmp_path / "split", **{"train.steps": 3}), dropout=0.1)
    first.train()
    second = ToyTrainer(toy_config(tmp_path / "split"), dropout=0.1)
    s2 = second.train()
    assert s2.steps_run == 3 and s2.resumed_from.endswith("step_00000003")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[i] for i in range(1, 7)] == [b[i] for i in range(1, 7)]  # bit-identical
    ea = load_file(str(tmp_path / "full" / "toy" / "toy.safetensors"))
    eb = load_file(str(tmp_path / "split" / "toy" / "toy.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    # The EMA export differs from the live weights (it is an average) but has every parameter.
    live = dict(second.engine.module.named_parameters())
    assert set(ea) == set(live)
    assert any(not torch.equal(ea[k], live[k].detach()) for k in ea)


class SkipSecond:
    """Gradient hook that vetoes its second call and records the parameters it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.trainer = None
        self.seen: list[dict[str, torch.Tensor]] = []
        self.moments: list[object] = []

    def after_backward(self, model) -> bool:
        self.calls += 1
        self.seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        self.moments.append(_snapshot(self.trainer.engine.optimizer.state_dict()))
        return self.calls != 2

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.calls = d["calls"]


@pytest.mark.parametrize("stage", [0, 2])
def test_gradient_hook_skips_step(tmp_path, stage):
    hook = SkipSecond()
    cfg = toy_config(tmp_path, **{"train.steps": 4, "distributed.zero_stage": stage, "checkpoint.every_steps": 4})
    t = ToyTrainer(cfg, dropout=0.0, gradient_hook=hook)
    hook.trainer = t
    s = t.train()
    assert hook.calls == 4 and s.skipped_steps == 1 and t.updates == 3
    # Step 2 was skipped: the parameters seen before step 3 are those seen before step 2.
    assert all(torch.equal(hook.seen[1][k], hook.seen[2][k]) for k in hook.seen[1])
    assert any(not torch.equal(hook.seen[0][k], hook.seen[1][k]) for k in hook.seen[0])
    # ... and so are the optimizer moments.
    assert _nested_equal(hook.moments[1], hook.moments[2])
    assert not _nested_equal(hook.moments[0], hook.moments[1])
    # Hook state travels in the checkpoint.
    hook2 = SkipSecond()
    t2 = ToyTrainer(toy_config(tmp_path, **{"train.steps": 5, "distributed.zero_stage": stage,
                                            "checkpoint.every_steps": 4}), dropout=0.0, gradient_hook=hook2)
    hook2.trainer = t2
    t2.train()
    assert hook2.calls == 5


def _snapshot(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return copy.copy(obj)


def _nested_equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_nested_equal(x, y) for x, y in zip(a, b))
    return a == b or repr(a) == repr(b)  # DeepSpeed's loss scaler objects define no __eq__


def _loss_and_grads(model, x, y, seed):
    torch.manual_seed(seed)
    model.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("impl,every_k", [("torch", 1), ("torch", 2), ("deepspeed", 1)])
def test_activation_checkpointing_same_loss_and_grads(impl, every_k):
    torch.manual_seed(0)
    model = ToyModel(dropout=0.2)  # dropout: the recomputation must replay the same RNG
    x = torch.randint(0, VOCAB, (4, 8))
    y = (x * 3 + 1) % VOCAB
    ref_loss, ref_grads = _loss_and_grads(model, x, y, seed=7)
    calls = []
    inner = model.resblock_runner

    def counting(block, h):
        calls.append(block)
        return inner(block, h)

    model.resblock_runner = counting
    n = install_activation_checkpointing(model, every_k=every_k, impl=impl)
    assert n == math.ceil(len(model.resblocks) / every_k)
    loss, grads = _loss_and_grads(model, x, y, seed=7)
    assert torch.equal(loss, ref_loss)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0)
    # Checkpointed blocks ran twice (forward + recomputation in backward), the others once.
    assert len(calls) == len(model.resblocks) + n


def test_activation_checkpointing_needs_resblocks():
    from megadalle.config import ConfigError

    with pytest.raises(ConfigError, match="resblock_runner"):
        install_activation_checkpointing(torch.nn.Linear(2, 2))


def test_weight_decay_groups_exclude_gains_biases_embeddings():
    model = ToyModel()
    groups = {g["name"]: g for g in weight_decay_groups(model, 0.045)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    kept = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.045 and groups["no_decay"]["weight_decay"] == 0.0
    assert "embed.weight" in kept and "head.bias" in kept and "resblocks.0.norm.weight" in kept
    assert decayed == {"head.weight"} | {f"resblocks.{i}.fc{j}.weight" for i in range(4) for j in (1, 2)}
    assert decayed | kept == set(names.values())


def test_warmup_plateau_schedule_halves_at_most_max_decays():
    sched = LRSchedule(ScheduleConfig(kind="warmup_plateau", warmup_steps=4, plateau_patience=2, max_decays=5),
                       peak_lr=1.0, total_updates=100)
    assert [sched.lr(u) for u in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert not sched.observe(10.0)  # first value is the best so far
    assert not sched.observe(9.0)
    decays = [sched.observe(9.5) or sched.observe(9.5) for _ in range(8)]
    assert sum(decays) == 5 and sched.lr(50) == 1.0 / 32
    state = sched.state_dict()
    again = LRSchedule(ScheduleConfig(kind="warmup_plateau", warmup_steps=4), 1.0, 100)
    again.load_state_dict(state)
    assert again.lr(50) == sched.lr(50) and again.state_dict() == state


def test_cosine_and_constant_schedules():
    cos = LRSchedule(ScheduleConfig(kind="cosine", warmup_steps=0, min_lr=0.1), peak_lr=1.0, total_updates=11)
    assert cos.lr(0) == 1.0 and abs(cos.lr(10) - 0.1) < 1e-12 and abs(cos.lr(5) - 0.55) < 1e-12
    assert not cos.observe(1.0)
    const = LRSchedule(ScheduleConfig(kind="constant", warmup_steps=2), peak_lr=0.5, total_updates=10)
    assert [const.lr(u) for u in range(4)] == [0.25, 0.5, 0.5, 0.5]


def test_ema_average_and_state():
    ema = EMA(decay=0.5, every=25)
    assert ema.due(25) and not ema.due(24)
    ema.update([("w", torch.tensor([2.0]))])
    # Second fold: the warmed-up decay (1 + 1) / (10 + 1) = 2/11 is below 0.5.
    assert ema.current_decay() == 2 / 11
    ema.update([("w", torch.tensor([4.0]))])
    expected = 2.0 * 2 / 11 + 4.0 * 9 / 11
    assert abs(ema.params["w"].item() - expected) < 1e-6 and ema.params["w"].device.type == "cpu"
    other = EMA(0.5, 25)
    other.load_state_dict(ema.state_dict())
    assert other.params["w"].item() == ema.params["w"].item() and other.updates == 2
    assert other.current_decay() == ema.current_decay()
    drained = EMA(0.5, 25)
    drained.update([("w", torch.tensor([1.0]))], keep=False)
    assert drained.params == {} and drained.updates == 0


def test_ema_decay_warms_up_to_the_configured_value():
    ema = EMA(decay=0.99, every=25)
    decays = []
    for _ in range(1000):
        decays.append(ema.current_decay())
        ema.update([("w", torch.tensor([0.0]))])
    assert decays[1] < 0.2 and all(a <= b for a, b in zip(decays, decays[1:])) and decays[-1] == 0.99


def test_ema_of_a_short_run_follows_the_recent_weights():
    # 40 folds of a weight that moves steadily from 0 to 1 (a 1000-update run averaged every 25):
    # the average must sit near the end, not near the first snapshot.
    ema = EMA(decay=0.99, every=25)
    for k in range(40):
        ema.update([("w", torch.tensor([k / 39]))])
    assert ema.params["w"].item() > 0.75


def test_optimizer_offload_with_bf16_zero3_trains_and_resumes(tmp_path):
    over = {"precision.mode": "bf16", "distributed.zero_stage": 3, "distributed.offload_optimizer": True}
    full = ToyTrainer(toy_config(tmp_path / "full", **over), dropout=0.0)
    full.train()
    ToyTrainer(toy_config(tmp_path / "split", **{**over, "train.steps": 3}), dropout=0.0).train()
    ToyTrainer(toy_config(tmp_path / "split", **over), dropout=0.0).train()
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert full.engine.zero_optimization_stage() == 3 and full.engine.zero_cpu_offload()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_accumulation_updates_every_step_over_its_micro_batches(tmp_path, stage):
    """micro-batch 2 x accumulation 2 trains as micro-batch 4 (the same samples): an update every
    step, none skipped, the same losses. (DeepSpeed, whose step() the trainer calls once per
    optimizer step, used to see the boundary every second step only.)"""
    runs = {}
    for micro, accum in ((4, 1), (2, 2)):
        cfg = toy_config(tmp_path / f"m{micro}", **{"train.micro_batch_size": micro, "train.grad_accum_steps": accum,
                                                     "distributed.zero_stage": stage})
        trainer = ToyTrainer(cfg, dropout=0.0)
        summary = trainer.train()
        assert summary.skipped_steps == 0 and trainer.updates == 6
        runs[micro] = losses(tmp_path / f"m{micro}")
    assert sorted(runs[4]) == list(range(1, 7))
    assert all(abs(runs[2][k] - runs[4][k]) <= 1e-5 * runs[4][k] for k in runs[4]), runs
