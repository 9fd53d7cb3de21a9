"""Real multi-process training: 2 CPU ranks over gloo, launched by `deepspeed` and `torchrun`.

One deepspeed launch trains the tiny transformer under ZeRO 0/1/2/3, ZeRO-3 with activation
checkpointing, and ZeRO-2 in bf16, one after another in the same 2 processes (each launch costs
15-30 s of imports here). The tests then compare against single-process runs of the same global
batch, convert the checkpoints to safetensors (ours and DeepSpeed's own zero_to_fp32.py), and a
second launch is SIGKILLed mid-training and resumed under torchrun.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megadalle import cli
from trainer_toy import RUNS, losses, make_transformer_trainer, probe_logits, transformer_config

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MULTI_RUNS = ["zero0", "zero1", "zero2", "zero3", "zero3_ckpt", "zero2_bf16"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_cmd(run_dir: Path, runs: str, *extra: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), str(TESTS / "trainer_toy.py"),
            "--model", "transformer", "--run_dir", str(run_dir), "--runs", runs, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two_ranks")
    proc = subprocess.run(_deepspeed_cmd(run_dir, ",".join(MULTI_RUNS)), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """Single-process references with the same global batch (4), in this process."""
    run_dir = tmp_path_factory.mktemp("one_rank")
    for name in ("zero0", "zero2_bf16"):
        trainer = make_transformer_trainer(transformer_config(run_dir / name, 1, **RUNS[name]))
        trainer.train()
        torch.save(probe_logits(trainer), run_dir / name / "probe.pt")
    return run_dir


@pytest.mark.parametrize("name", MULTI_RUNS)
def test_two_ranks_match_one_process(two_ranks, one_rank, name):
    two = losses(two_ranks / name, "transformer")
    bf16 = "bf16" in name
    one = losses(one_rank / ("zero2_bf16" if bf16 else "zero0"), "transformer")
    assert sorted(two) == sorted(one) == list(range(1, 11))
    # fp32: only the order of the gradient sum differs; bf16: 16-bit rounding of activations.
    # Measured: 9.5e-7 in fp32 (two float32 ulps at a loss of ~6), 6e-5 in bf16; the README's bounds.
    tol = 5e-4 if bf16 else 4e-6
    for step in one:
        assert abs(two[step] - one[step]) <= tol, (name, step, two[step], one[step])
    assert one[10] < one[1] - 0.05  # it trains


def test_activation_checkpointing_same_losses_under_zero3(two_ranks):
    assert losses(two_ranks / "zero3_ckpt", "transformer") == losses(two_ranks / "zero3", "transformer")


def _plain_logits(weights: Path, probe: dict, dtype: torch.dtype = torch.float32):
    from safetensors.torch import load_file

    from megadalle.config import Config
    from megadalle.transformer.model import DALLETransformer

    cfg = Config.load(weights.with_suffix(".yaml"))
    model = DALLETransformer(cfg.transformer)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model = model.to(dtype).eval()
    with torch.no_grad():
        return model(probe["text"], probe["codes"])


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero2_bf16"])
def test_zero_to_safetensors_reproduces_trained_logits(two_ranks, tmp_path, name, capsys):
    out = tmp_path / "transformer.safetensors"
    ckpts = two_ranks / name / "transformer" / "checkpoints"
    assert cli.main(["convert", "zero-to-safetensors", str(ckpts), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.with_suffix(".yaml").is_file()
    probe = torch.load(two_ranks / name / "probe.pt")
    if "bf16" in name:
        # The engine ran with bf16 copies of the fp32 masters that the export holds.
        text, image = _plain_logits(out, probe, torch.bfloat16)
        torch.testing.assert_close(image.float(), probe["image_logits"], atol=0.05, rtol=0.02)
    else:
        text, image = _plain_logits(out, probe)
        torch.testing.assert_close(text, probe["text_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(image, probe["image_logits"], atol=1e-5, rtol=1e-5)


def test_deepspeeds_own_zero_to_fp32_reads_our_checkpoints(two_ranks, tmp_path):
    from safetensors.torch import load_file

    from megadalle.tools.zero_to_safetensors import consolidate

    ckpts = two_ranks / "zero3" / "transformer" / "checkpoints"
    proc = subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "ds"),
                           "--safe_serialization"], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = {}
    for f in (tmp_path / "ds").glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    ours, _, _ = consolidate(ckpts)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k].float(), ours[k]) for k in ours)


def test_inspect_prints_step_sizes_dtypes(two_ranks, capsys):
    ckpts = two_ranks / "zero2_bf16" / "transformer" / "checkpoints"
    assert cli.main(["inspect", str(ckpts), "--params", "2"]) == 0
    out = capsys.readouterr().out
    assert "step 10, 2 ranks, ZeRO-2, precision bf16" in out
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in out and "bfloat16" in out
    assert "transformer dim 128, depth 4" in out


def test_convert_and_inspect_refuse_bad_paths(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["convert", "zero-to-safetensors", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_sigkill_mid_training_then_resume_matches_uninterrupted(two_ranks, tmp_path):
    """Kill every process of a 2-rank run with SIGKILL, resume it under torchrun: the loss of
    every step equals the uninterrupted run's (bit for bit)."""
    run_dir = tmp_path / "killed"
    jsonl = run_dir / "zero1" / "transformer" / "metrics.jsonl"
    latest = run_dir / "zero1" / "transformer" / "checkpoints" / "latest"
    proc = subprocess.Popen(_deepspeed_cmd(run_dir, "zero1", "--step_delay", "0.4", "checkpoint.every_steps=2"),
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and jsonl.is_file() and len(losses(run_dir / "zero1", "transformer")) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = losses(run_dir / "zero1", "transformer")
    assert 5 <= max(before) < 10
    resumed_from = latest.read_text()
    env = {**_env(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()),
                           str(TESTS / "trainer_toy.py"), "--model", "transformer", "--run_dir", str(run_dir),
                           "--runs", "zero1", "checkpoint.every_steps=2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    after = losses(run_dir / "zero1", "transformer")
    assert resumed_from != "step_00000000" and int(resumed_from.split("_")[1]) >= 2
    assert after == losses(two_ranks / "zero1", "transformer")
