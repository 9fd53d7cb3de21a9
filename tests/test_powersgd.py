"""PowerSGD exchange with 4 real gloo processes as 2 machines x 2 ranks, on real DeepSpeed engines.

All distributed checks run in ONE launch (a 4-process launch costs 10-30 s on 2 cores); each rank
writes what it measured to a JSON file and the tests below assert on those files.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from megadalle.config import ConfigError, load_config
from megadalle.distributed.powersgd import (
    build_layout, check_supported, default_rank, orthogonalise, predicted_compression_rate, shard_rank)
from megadalle.transformer.model import DALLETransformer

WORLD, GPUS_PER_NODE = 4, 2
BATCH = 4
STEPS, WARMUP = 120, 30  # loss-gap comparison: linear warm-up as in the paper's schedule
LR = 3e-3
TINY = load_config("tiny")
DIM = TINY.transformer.dim


class TinyTransformerLoss(nn.Module):
    """The tiny preset's DALL-E transformer; forward returns the training loss."""

    def __init__(self) -> None:
        super().__init__()
        self.model = DALLETransformer(TINY.transformer)

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.model.loss(text, codes)["loss"]


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams following a fixed random successor table with 10% noise: learnable, and
    different on every rank and step. Returns text (B, text_len) without padding and codes
    (B, image_len)."""
    t = TINY.transformer
    table = torch.randperm(t.text_vocab_size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(1000 * step + rank)
    toks = torch.empty(BATCH, t.text_len + t.image_len, dtype=torch.long)
    toks[:, 0] = torch.randint(1, t.text_vocab_size, (BATCH,), generator=g)
    for i in range(1, toks.shape[1]):
        noise = torch.rand(BATCH, generator=g) < 0.1
        rand = torch.randint(t.text_vocab_size, (BATCH,), generator=g)
        toks[:, i] = torch.where(noise, rand, table[toks[:, i - 1]])
    return toks[:, :t.text_len].clamp(min=1), toks[:, t.text_len:] % t.image_vocab_size


# --------------------------------------------------------------------------------------------
# The 4-process worker
# --------------------------------------------------------------------------------------------

def _engine(stage: int, seed: int = 0, optimizer: str = "AdamW"):
    import deepspeed

    torch.manual_seed(seed)  # same initial weights on every rank
    model = TinyTransformerLoss()
    params = ({"lr": LR, "betas": [0.9, 0.96], "weight_decay": 0.0, "torch_adam": True} if optimizer == "AdamW"
              else {"lr": 0.2, "momentum": 0.9})  # AdamW with the paper's betas
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
           "optimizer": {"type": optimizer, "params": params},
           "zero_optimization": {"stage": stage, "overlap_comm": False}, "steps_per_print": 10 ** 9,
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                      dist_init_required=False)
    return engine


def _hook(engine, comm, compress: bool):
    from megadalle.distributed.powersgd import DeepSpeedExchange, PowerSGDExchange

    ex = PowerSGDExchange(engine.module, comm, rank=default_rank(DIM), compress=compress, seed=0,
                          uncompressed=list(TINY.distributed.powersgd.uncompressed))
    return DeepSpeedExchange(engine, ex)


def _flat_params(engine) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in engine.module.parameters()])


def _global_mean(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x])
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _train(engine, hook, rank: int, steps: range, nan_at: int = -1, warmup: int = 0) -> list[float]:
    losses = []
    for step in steps:
        loss = engine(*_batch(rank, step))
        engine.backward(loss)
        if warmup:
            for group in engine.optimizer.param_groups:
                group["lr"] = LR * min(1.0, (step + 1) / warmup)
        if hook is not None:
            if step == nan_at and rank == WORLD - 1:
                next(engine.module.parameters()).grad.view(-1)[0] = float("nan")
            if not hook.after_backward(engine):
                losses.append(float("nan"))
                continue
        engine.step()
        losses.append(_global_mean(loss.item()))
    return losses


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megadalle.distributed.comm import Comm
    from megadalle.distributed.engine import init_distributed
    from megadalle.distributed.groups import build_groups

    init_distributed(TINY.replace(**{"distributed.timeout_s": 120}).distributed)  # gloo, as the Trainer does
    out: dict = {}
    groups = build_groups(gpus_per_node=GPUS_PER_NODE)
    comm = Comm(groups)

    # -- groups: who is in my intra / inter group, seen through a real all-reduce of rank bits
    bits = torch.tensor([float(2 ** rank)])
    dist.all_reduce(bits, group=groups.intra)
    inter_bits = torch.tensor([float(2 ** rank)])
    dist.all_reduce(inter_bits, group=groups.inter)
    out["groups"] = {"machine": groups.machine, "local": groups.local_index, "intra_bits": int(bits.item()),
                     "inter_bits": int(inter_bits.item()), "machines": groups.machines}

    # -- 1. compression off == plain DeepSpeed data parallelism (ZeRO-0 and ZeRO-1). SGD keeps the
    # comparison linear in the gradients; Adam would blow float rounding of near-zero gradients up
    # to the size of the learning rate.
    for stage in (0, 1):
        plain = _engine(stage, optimizer="SGD")
        start = _flat_params(plain)
        _train(plain, None, rank, range(3))
        ours = _engine(stage, optimizer="SGD")
        _train(ours, _hook(ours, comm, compress=False), rank, range(3))
        out[f"off_vs_plain_stage{stage}"] = (_flat_params(plain) - _flat_params(ours)).abs().max().item()
        out[f"moved_stage{stage}"] = (_flat_params(ours) - start).abs().max().item()

    # -- 1b. with compression on, ZeRO-1 (DeepSpeed's partitioned optimizer fed by our exchange)
    # takes exactly the steps ZeRO-0 takes
    compressed = {}
    for stage in (0, 1):
        eng = _engine(stage, optimizer="SGD")
        _train(eng, _hook(eng, Comm(groups), compress=True), rank, range(3))
        compressed[stage] = _flat_params(eng)
    out["compressed_stage1_vs_stage0"] = (compressed[0] - compressed[1]).abs().max().item()

    # -- 2. loss after STEPS steps and inter-machine bytes, off vs on
    comm_off, comm_on = Comm(groups), Comm(groups)
    off = _engine(0)
    loss_off = _train(off, _hook(off, comm_off, compress=False), rank, range(STEPS), warmup=WARMUP)
    on = _engine(0)
    hook_on = _hook(on, comm_on, compress=True)
    loss_on = _train(on, hook_on, rank, range(STEPS), warmup=WARMUP)
    compressed_numel = hook_on.exchange.layout.compressed_numel[groups.local_index]
    out["loss"] = {"off": loss_off, "on": loss_on}
    out["bytes"] = {"off_inter": comm_off.bytes("inter") / STEPS, "on_inter": comm_on.bytes("inter") / STEPS,
                    "on_pq": comm_on.bytes("inter", "powersgd") / STEPS,
                    "on_dense": comm_on.bytes("inter", "dense") / STEPS,
                    "off_intra": comm_off.bytes("intra") / STEPS, "on_intra": comm_on.bytes("intra") / STEPS,
                    "compressed_numel": compressed_numel}

    # -- 3. resume with error buffers: uninterrupted vs save at k / load into fresh engines. SGD with
    # momentum (restored from DeepSpeed's checkpoint) for the same reason as in 1. Each rank writes
    # its own hook state, as the Trainer's per-rank checkpoint files do.
    ckpt = Path(outdir) / "ckpt"
    k, n = 4, 8
    straight = _engine(0, optimizer="SGD")
    h = _hook(straight, Comm(groups), True)
    _train(straight, h, rank, range(k))
    straight.save_checkpoint(str(ckpt), tag="k")
    state_file = ckpt / f"powersgd_rank{rank}.pt"
    saved = h.state_dict()
    torch.save(saved, state_file)
    _train(straight, h, rank, range(k, n))
    for load_errors in (True, False):
        resumed = _engine(0, seed=99, optimizer="SGD")  # different init: everything must come from the checkpoint
        h2 = _hook(resumed, Comm(groups), True)
        resumed.load_checkpoint(str(ckpt), tag="k")
        if load_errors:
            h2.load_state_dict(torch.load(state_file))
            before, again = saved["error_sum"], h2.state_dict()["error_sum"]
            # machine 0 holds the machines' sum of the (saved / restored) buffers, the others None
            out["resume_error_sum_diff"] = 0.0 if before is None else (again - before).abs().max().item()
            out["error_sum_norm"] = 0.0 if before is None else before.norm().item()
        _train(resumed, h2, rank, range(k, n))
        diff = (_flat_params(straight) - _flat_params(resumed)).abs().max().item()
        out["resume_with_errors" if load_errors else "resume_without_errors"] = diff

    # -- 3b. bad hook states: every rank raises a ConfigError (agreed first, no rank left hanging)
    def spoil(st: dict, on_rank: int, **change) -> dict:
        return dict(st, **change) if rank == on_rank else st

    bad_cases = {
        "other_layout": lambda st: spoil(st, 1, gpus_per_node=4),
        "lost_sum": lambda st: spoil(st, 0, error_sum=None),
        "garbage": lambda st: {"not": "a state"} if rank == 3 else st,
    }
    out["bad_states"] = {}
    for case, corrupt in bad_cases.items():
        try:
            h2.load_state_dict(corrupt(torch.load(state_file)))
            out["bad_states"][case] = ""
        except ConfigError as e:
            out["bad_states"][case] = str(e)

    # -- 4. a NaN on one rank skips the step on every rank, leaving weights and error buffers alone
    before_p, before_e = _flat_params(on), hook_on.exchange.error.clone()
    losses = _train(on, hook_on, rank, range(STEPS, STEPS + 1), nan_at=STEPS)
    out["skip"] = {"returned_skip": math.isnan(losses[0]), "skipped": hook_on.exchange.skipped,
                   "params_unchanged": bool(torch.equal(before_p, _flat_params(on))),
                   "errors_unchanged": bool(torch.equal(before_e, hook_on.exchange.error)),
                   "grads_zeroed": all(p.grad is None or not p.grad.any() for p in on.module.parameters())}
    after = _train(on, hook_on, rank, range(STEPS + 1, STEPS + 2))
    out["skip"]["finite_after"] = math.isfinite(after[0])

    # -- 5. through the Trainer (tests/trainer_toy.py): distributed.powersgd.enabled trains, writes
    # per-rank hook state into its checkpoints and resumes from them
    from trainer_toy import ToyTrainer, losses, toy_config

    over = {"distributed.powersgd.enabled": True, "distributed.gpus_per_node": GPUS_PER_NODE,
            "train.steps": 6, "checkpoint.every_steps": 3}
    straight_dir, resumed_dir = Path(outdir) / "trainer_straight", Path(outdir) / "trainer_resumed"
    t = ToyTrainer(toy_config(straight_dir, **over), dropout=0.0)
    t.train()
    out["trainer"] = {"hooks": [type(h).__name__ for h in t.gradient_hook.hooks], "metrics": t.gradient_hook.metrics(),
                      "ds_allreduce": t.engine.enable_backward_allreduce}
    ToyTrainer(toy_config(resumed_dir, **{**over, "train.steps": 3}), dropout=0.0).train()
    ToyTrainer(toy_config(resumed_dir, **over), dropout=0.0).train()
    out["trainer"]["straight"], out["trainer"]["resumed"] = losses(straight_dir), losses(resumed_dir)

    Path(outdir, f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("powersgd")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


# --------------------------------------------------------------------------------------------
# Assertions on what the 4 ranks measured
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_groups_are_machines_and_local_indices(results):
    for r, res in enumerate(results):
        g = res["groups"]
        assert (g["machine"], g["local"], g["machines"]) == (r // 2, r % 2, 2)
        assert g["intra_bits"] == sum(2 ** x for x in (2 * (r // 2), 2 * (r // 2) + 1))  # {0,1} or {2,3}
        assert g["inter_bits"] == 2 ** (r % 2) + 2 ** (r % 2 + 2)  # {0,2} or {1,3}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_compression_off_matches_plain_deepspeed(results, stage):
    for res in results:
        assert res[f"moved_stage{stage}"] > 1e-3  # training really changed the weights...
        assert res[f"off_vs_plain_stage{stage}"] < 1e-5  # ...identically to DeepSpeed's own all-reduce


@pytest.mark.slow
def test_zero1_matches_zero0_with_compression(results):
    for res in results:
        assert res["compressed_stage1_vs_stage0"] < 1e-6


@pytest.mark.slow
def test_inter_machine_bytes_and_loss_with_compression(results):
    res = results[0]
    b = res["bytes"]
    # Uncompressed bytes of the matrices PowerSGD handles = off-mode total minus what stays dense.
    # At the default rank (29 at d_model 128: 15 per shard) the formula predicts 23% sent; the
    # fused qkv matrix (3d x d) compresses better than the 3 separate d x d matrices it assumes.
    matrices_off = b["off_inter"] - b["on_dense"]
    assert abs(matrices_off - 4 * b["compressed_numel"]) < 0.01 * matrices_off  # fp32, all-reduce over 2
    assert b["on_pq"] <= 0.20 * matrices_off
    assert b["on_inter"] < b["off_inter"]
    assert b["on_intra"] == b["off_intra"]  # nothing compressed inside a machine
    # Ring formulas with 2 ranks per level: reduce-scatter + all-gather inside (S/2 each of the
    # 2-chunk buffer) equal one all-reduce of a chunk across; +4 bytes each for the skip flag.
    assert b["off_intra"] - 4 == 2 * (b["off_inter"] - 4)
    off, on = res["loss"]["off"], res["loss"]["on"]
    tail_off, tail_on = sum(off[-5:]) / 5, sum(on[-5:]) / 5
    print(f"loss after {STEPS} steps (mean of last 5): off {tail_off:.4f}, on {tail_on:.4f}, "
          f"gap {tail_on / tail_off - 1:+.1%}")
    assert tail_off < 0.5 * off[0]  # it learned
    assert abs(tail_on - tail_off) <= 0.03 * tail_off
    for other in results[1:]:
        assert other["loss"] == res["loss"]  # global means: identical on every rank


@pytest.mark.slow
def test_resume_with_error_buffers_is_exact(results):
    for r, res in enumerate(results):
        if r // GPUS_PER_NODE == 0:  # machine 0 keeps the sums
            assert res["error_sum_norm"] > 0
            assert res["resume_error_sum_diff"] < 1e-6
        assert res["resume_with_errors"] < 1e-6
        # The buffers matter: dropping them changes the trajectory by far more.
        assert res["resume_without_errors"] > 100 * max(res["resume_with_errors"], 1e-9)


@pytest.mark.slow
def test_bad_hook_state_fails_on_every_rank_with_a_message(results):
    for r, res in enumerate(results):
        bad = res["bad_states"]
        assert all(bad.values()), bad  # every rank raised, for every case
    assert "--distributed.gpus_per_node=4" in results[1]["bad_states"]["other_layout"]
    assert "missing or has the wrong size" in results[0]["bad_states"]["lost_sum"]
    assert "missing or from another version" in results[3]["bad_states"]["garbage"]
    assert "another rank" in results[2]["bad_states"]["garbage"]


@pytest.mark.slow
def test_nonfinite_skips_on_every_rank(results):
    for res in results:
        s = res["skip"]
        assert s == {"returned_skip": True, "skipped": 1, "params_unchanged": True, "errors_unchanged": True,
                     "grads_zeroed": True, "finite_after": True}


@pytest.mark.slow
def test_trainer_trains_and_resumes_with_powersgd(results):
    tr = results[0]["trainer"]
    assert tr["hooks"] == ["DeepSpeedExchange"] and tr["ds_allreduce"] is False
    assert tr["metrics"]["powersgd_inter_bytes"] > 0
    straight = {int(k): v for k, v in tr["straight"].items()}
    resumed = {int(k): v for k, v in tr["resumed"].items()}
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Single-process checks
# --------------------------------------------------------------------------------------------

def _gram_schmidt(p: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(p)
    for j in range(p.shape[1]):
        v = p[:, j] - q[:, :j] @ (q[:, :j].T @ p[:, j])
        q[:, j] = v / v.norm()
    return q


@pytest.mark.parametrize("cond", [1e3, 1e6])
def test_householder_stays_orthogonal_where_gram_schmidt_does_not(cond):
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(256, 16, generator=g))
    v, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    p = u @ torch.diag(torch.logspace(0, -math.log10(cond), 16)) @ v.T  # (256, 16), condition number `cond`
    eye = torch.eye(16)
    house = (orthogonalise(p, 1e-6).T @ orthogonalise(p, 1e-6) - eye).abs().max().item()
    gs = (_gram_schmidt(p).T @ _gram_schmidt(p) - eye).abs().max().item()
    assert house < 1e-5
    assert gs > 100 * house


def test_orthogonalise_handles_zero_and_repeated_columns():
    for p in (torch.zeros(64, 8), torch.ones(64, 8), torch.randn(64, 1).repeat(1, 8)):
        q = orthogonalise(p, 1e-6)
        assert torch.isfinite(q).all()
        assert (q.T @ q - torch.eye(8)).abs().max() < 1e-4


def test_rank_defaults_and_paper_formula():
    assert default_rank(3968) == 896 and shard_rank(896, 8) == 112  # the paper: 112 per GPU shard
    # The general formula gives the paper's 1 - 5r/(8 d) with 8 GPUs per machine...
    assert predicted_compression_rate(112, 3968, 8) == pytest.approx(1 - 5 * 896 / (8 * 3968))
    assert predicted_compression_rate(112, 3968, 8) == pytest.approx(0.859, abs=1e-3)
    # ...and 1 - r/d with 2 GPUs per machine: at the tiny width r = 29, 15 per shard.
    assert default_rank(128) == 29 and shard_rank(29, 2) == 15
    assert predicted_compression_rate(15, 128, 2) == pytest.approx(1 - 2 * 15 / 128)


def test_layout_matches_formula_on_transformer_matrices():
    """Counting from the layout itself: attention d x d and MLP d x 4d shards at rank s send the
    fraction the formula predicts."""
    d, L, s = 128, 2, 4
    layer = nn.ModuleDict({f"att{i}": nn.Linear(d, d, bias=False) for i in range(4)})
    layer["fc1"], layer["fc2"] = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
    lay = build_layout(layer, L, s, uncompressed=[])
    dense = sum(sh.numel for loc in range(L) for sh in lay.shards[loc])
    sent = sum((sh.rows + sh.cols) * sh.rank for loc in range(L) for sh in lay.shards[loc])
    assert all(sh.rank == s for loc in range(L) for sh in lay.shards[loc])
    assert 1 - sent / dense == pytest.approx(predicted_compression_rate(s, d, L))


def test_plain_parameters_are_never_compressed():
    model = TinyTransformerLoss()
    lay = build_layout(model, 2, 4, uncompressed=list(TINY.distributed.powersgd.uncompressed))
    plain = {n.removeprefix("model.") for n, _ in lay.plain}
    assert {"bos", "pad_embed", "text_pos_embed", "row_embed", "col_embed", "text_embed.weight",
            "image_embed.weight", "text_head.weight", "text_head.bias", "image_head.weight",
            "final_norm.weight", "resblocks.0.qkv.bias", "resblocks.1.norm.weight"} <= plain
    depth = TINY.transformer.depth
    assert {m.name.removeprefix("model.") for m in lay.matrices} == (
        {f"resblocks.{2 * i}.{n}.weight" for i in range(depth) for n in ("qkv", "proj")}
        | {f"resblocks.{2 * i + 1}.{n}.weight" for i in range(depth) for n in ("fc_in", "fc_out")})


@pytest.mark.parametrize("stage, mode, fragment", [
    (2, "bf16", "zero_stage 0 or 1"), (3, "fp32", "zero_stage 0 or 1"), (0, "fp16", "precision.mode=fp16")])
def test_unsupported_combinations_are_refused(stage, mode, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_supported(stage, mode)
    check_supported(1, "bf16")  # the supported ones pass
