"""`megadalle plan` against hand computation: 16 bytes/parameter for mixed-precision Adam divided
per ZeRO stage, the activation formulas, the paper's PowerSGD rate, and the paper's 12B setup
on 1024 x 16 GB V100s fitting."""

import json

import pytest
import torch

from megadalle.cli import main
from megadalle.errors import CommandError
from megadalle.config import load_config
from megadalle.distributed.plan import (GiB, ParamCounts, activations, build_plan, count_parameters,
                                        paper_memory, parse_bytes, traffic, zero_memory)
from megadalle.transformer.model import DALLETransformer

COUNTS = ParamCounts(matrices=1_000_000_000, others=100_000_000, largest_block=10_000_000)
NO_ACT = activations(load_config("tiny").transformer, 1, "fp32")


def test_meta_count_equals_the_real_model_and_the_12b_hand_count():
    t = load_config("tiny").transformer
    real = DALLETransformer(t)
    c = count_parameters(t)
    assert c.total == sum(p.numel() for p in real.parameters())
    assert c.matrices == sum(p.numel() for p in real.resblocks.parameters() if p.dim() >= 2)
    # 12B: per layer qkv 3d^2 + proj d^2 + MLP 2 x 4d^2 = 12 d^2, 64 layers, d = 3968.
    c12 = count_parameters(load_config("12b").transformer)
    assert c12.matrices == 64 * 12 * 3968 ** 2 == 12_092_178_432
    assert c12.largest_block == 8 * 3968 ** 2  # the MLP resblock
    assert 12.0e9 < c12.total < 12.5e9  # "12B"


@pytest.mark.parametrize("stage, matrix_bytes, other_bytes", [
    # Matrices: 2 (fp16 weights) + 2 (grads) + 12 (fp32 master, m, v) = 16 B; others (fp32):
    # 4 + 4 + 8 = 16 B; sharded over g = 8 from the optimizer (1) to the grads (2) to the weights (3).
    (0, 2 + 2 + 12, 4 + 4 + 8),
    (1, 2 + 2 + 12 / 8, 4 + 4 + 8 / 8),
    (2, 2 + (2 + 12) / 8, 4 + (4 + 8) / 8),
    (3, 16 / 8, 16 / 8)])
def test_mixed_precision_adam_is_16_bytes_divided_per_stage(stage, matrix_bytes, other_bytes):
    m = zero_memory(COUNTS, NO_ACT, stage, group=8)
    transient = (2 * 2 + 2) * COUNTS.largest_block if stage == 3 else 0  # 2 gathered blocks + 1 gradient
    assert m.params + m.grads + m.optimizer == pytest.approx(
        matrix_bytes * COUNTS.matrices + other_bytes * COUNTS.others)
    assert m.transient == transient
    assert m.total_checkpointed - m.states == NO_ACT.checkpointed


def test_fp32_and_single_gpu_do_not_shard():
    m = zero_memory(COUNTS, NO_ACT, 3, group=1, states="fp32")
    assert (m.params, m.grads, m.optimizer, m.transient) == (4 * 1.1e9, 4 * 1.1e9, 8 * 1.1e9, 0)


def test_activations_by_hand():
    t = load_config("tiny").transformer  # S = 32 + 144 = 176, d = 128, h = 4, MLP 512, depth 4
    S, d = 176, 128
    attn = 4 * S * d + 2 * S * d + 3 * 2 * S * d + 2 * 4 * S * S + 2 * S * d  # identity path fp32
    mlp = 4 * S * d + 2 * S * d + 2 * 2 * S * 512
    logits = 2 * 4 * (32 * 512 + 144 * 512)
    a = activations(t, 3, "fp16_per_resblock")
    assert (a.attention_block, a.mlp_block, a.logits) == (3 * attn, 3 * mlp, 3 * logits)
    assert a.full == 4 * 3 * (attn + mlp) + 3 * logits
    assert a.checkpointed == 2 * 4 * 3 * 4 * S * d + 3 * max(attn, mlp) + 3 * logits
    assert activations(t, 1, "fp32").block_input == 4 * S * d


def test_traffic_and_powersgd_rate_by_hand():
    t = load_config("12b").transformer
    c = count_parameters(t)
    tr = traffic(c, t, nodes=128, gpus_per_node=8, rank=896)
    assert tr.compression_rate == pytest.approx(1 - 5 * 896 / (8 * 3968))  # ~86%
    grads = 2 * c.matrices + 4 * c.others
    assert tr.flat_zero012 == pytest.approx(2 * 1023 / 1024 * grads)
    assert tr.inter_uncompressed == pytest.approx(2 * 127 / 128 * grads / 8)
    sent = 2 * c.matrices * 5 * 896 / (8 * 3968) + 4 * c.others
    assert tr.inter_powersgd == pytest.approx(2 * 127 / 128 * sent / 8)
    assert tr.intra == pytest.approx(7 / 8 * (2 * (2 * c.matrices + 4 * c.others) + grads))


def test_the_papers_12b_setup_fits_on_1024_v100_16gb():
    cfg = load_config("12b")
    plan = build_plan(cfg, nodes=128, gpus_per_node=8, gpu_memory=16 * GiB, reserve=GiB // 2)
    c = count_parameters(cfg.transformer)
    act = activations(cfg.transformer, 1, cfg.precision.mode)
    # Paper states per GPU: matrices (2 weights + 4 moments + 2 error buffer) / 8; others 16 / 8.
    states = (8 * c.matrices + 16 * c.others) / 8 + 6 * 8 * 3968 ** 2
    assert plan["paper"]["total_checkpointed"] == pytest.approx(states + act.checkpointed)
    assert plan["paper_fits"] and plan["paper"]["total_checkpointed"] < 15.5 * GiB
    # ... but not without checkpointing, nor with fp32 error buffers, nor with unsharded fp16 weights.
    assert plan["paper"]["total_full"] > 16 * GiB
    assert paper_memory(c, act, 8, error_buffer_bytes=4).total_checkpointed > 15.5 * GiB
    assert [z["total_checkpointed"] <= plan["budget"] for z in plan["zero"]] == [False, False, False, True]


def test_the_configured_paper_scheme_at_12b():
    """What megadalle's scheme holds on DeepSpeed, from the DeepSpeed config and partition layout the
    run uses: bf16 weights, gradient partition, master copy and Adam moments (2 + 2 + 2 + 4 bytes)
    plus 16-bit error buffers for the compressed matrices, over 8 GPUs a machine."""
    cfg = load_config("12b")
    assert (cfg.distributed.scheme, cfg.distributed.zero_stage, cfg.distributed.powersgd.enabled) == ("paper", 3, True)
    plan = build_plan(cfg, nodes=128, gpus_per_node=8, gpu_memory=16 * GiB, reserve=GiB // 2)
    c = count_parameters(cfg.transformer)
    sc = plan["scheme"]
    assert sc["persistent"] == pytest.approx(10 * c.total / 8 + 2 * c.matrices / 8, rel=0.01)
    # DeepSpeed's own gradient partition and master copy (which the paper folds away) make it miss 16 GB...
    assert not plan["scheme_fits"] and plan["configured"]["fits"] is False
    assert build_plan(cfg, nodes=128, gpus_per_node=8, gpu_memory=24 * GiB, reserve=GiB // 2)["scheme_fits"]
    # ... while the matrices cross machines at 9.4% of their uncompressed bytes (square partition views).
    st = plan["scheme_traffic"]
    assert st["rank_per_gpu"] == 112
    assert st["inter_matrices"] / st["inter_matrices_uncompressed"] == pytest.approx(0.094, abs=0.002)


def test_plan_command_output_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--preset", "12b", "--nodes", "128", "--gpus-per-node", "8", "--gpu-memory", "16GiB",
               "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "paper's scheme with activation checkpointing" in text and "-> fits" in text
    assert "compressed by 85.9%" in text
    data = json.loads(out.read_text())
    assert data["gpus"] == 1024 and data["paper_fits"] is True


@pytest.mark.parametrize("argv, message", [
    (["--gpu-memory", "lots"], "not understood"),
    (["--gpu-memory", "0GiB"], "must be > 0"),
    (["--gpu-memory", "1GiB", "--reserve", "2GiB"], "leaves nothing"),
    (["--gpu-memory", "16GiB", "--nodes", "0"], "must be >= 1"),
])
def test_plan_bad_arguments(argv, message, capsys):
    base = ["plan", "--preset", "tiny", "--nodes", "1", "--gpus-per-node", "2"]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * GiB == parse_bytes("16G") == parse_bytes("16384MiB")
    assert parse_bytes("16 GB") == 16 * 10 ** 9 and parse_bytes("1.5GiB") == 3 * GiB // 2
    with pytest.raises(CommandError):
        parse_bytes("16 parsecs")
