"""Each footgun a newcomer met (issue 17) has a test that would have caught it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megadalle import cli
from megadalle.config import PRESETS, ConfigError, OptimizerConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TRAINING_COMMANDS = ["train", "train-dvae", "train-clip"]


def test_the_plateau_schedule_without_evaluations_is_refused():
    with pytest.raises(ConfigError, match="warmup_plateau halves the lr .* needs eval_every > 0"):
        load_config(None, None, {"train.eval_every": 0})
    # Every preset is coherent: its plateau schedules have an evaluation cadence.
    for name in PRESETS:
        cfg = load_config(name)
        for section in (cfg.train, cfg.dvae_train, cfg.clip_train):
            assert section.schedule.kind != "warmup_plateau" or section.eval_every > 0, name


def test_version_and_print_config_round_trip(tmp_path, capsys):
    from megadalle import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"megadalle {__version__}"
    assert cli.main(["train", "--preset", "tiny", "--train.steps", "7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(printed)
    again = load_config(None, str(tmp_path / "c.yaml"))
    assert again.to_dict() == load_config("tiny", None, {"train.steps": 7}).to_dict()
    assert yaml.safe_load(printed)["train"]["steps"] == 7


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_training_commands_share_the_launcher_flags(command, capsys):
    for flags in (["--deepspeed_config", "x.json"], ["--deepspeed-config", "x.json"], ["--local_rank=0"],
                  ["--local-rank", "1"], ["--resume", "latest"]):
        assert cli.main([command, "--preset", "tiny", *flags, "--print-config"]) == 0, (command, flags)
    capsys.readouterr()


def _launcher_lines() -> list[str]:
    files = [ROOT / "README.md", *ROOT.glob("megadalle/**/*.py"), *ROOT.glob("slurm/*")]
    return [line.strip() for f in files if f.is_file() for line in f.read_text(errors="replace").splitlines()
            if re.search(r"\bdeepspeed\s+--", line)]


def test_documented_deepspeed_launches_use_module_not_m():
    lines = _launcher_lines()
    assert lines, "no deepspeed launch is documented"
    # What sits between `deepspeed` and the module name is the launcher's own arguments.
    bad = [ln for ln in lines if re.search(r"\bdeepspeed\s+(\S+\s+)*?-m\s+megadalle", ln)]
    assert not bad, f"DeepSpeed 0.19's launcher has no -m (it is --module): {bad}"


def test_the_documented_deepspeed_launch_runs(tmp_path):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "1", "--master_port", "29731", "--module", "megadalle", "train",
           "--preset", "tiny", "--logging.run_dir", str(tmp_path), "--logging.progress", "false",
           "--logging.tensorboard", "false", "--train.synthetic_data", "true", "--train.steps", "1",
           "--train.micro_batch_size", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (tmp_path / "transformer" / "checkpoints" / "latest").read_text() == "step_00000001"


def test_optimizer_offload_steps_on_the_cpu_even_on_a_gpu_machine():
    from megadalle.distributed.engine import build_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "weight_decay": 0.0}]
    # on_cuda=True is what a GPU machine passes: with offload the optimizer must still be a CPU one.
    opt = build_optimizer(groups, OptimizerConfig(impl="auto"), on_cuda=True, offload=True)
    assert type(opt) is torch.optim.AdamW and not opt.defaults.get("fused")
    with pytest.raises(ConfigError, match="apex runs on the GPU"):
        build_optimizer(groups, OptimizerConfig(impl="apex"), on_cuda=True, offload=True)


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """W&B in offline mode (no network): the run id is saved in the checkpoint and reused."""
    from trainer_toy import ToyTrainer, toy_config

    from megadalle.training.checkpoint import load_torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = ToyTrainer(toy_config(tmp_path, **{"train.steps": 3, "logging.wandb": True}), dropout=0.0)
    first.train()
    state = load_torch(tmp_path / "toy" / "checkpoints" / "step_00000003" / "trainer_state.pt")
    assert state["wandb_id"] == first.wandb_id and len(first.wandb_id) == 16
    second = ToyTrainer(toy_config(tmp_path, **{"logging.wandb": True}), dropout=0.0)
    second.train()
    assert second.wandb_id == first.wandb_id
    runs = sorted(p.name for p in (tmp_path / "toy" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{first.wandb_id}" in r for r in runs)  # the same run, resumed


def test_the_repository_stands_on_its_own():
    """Facts are stated where they are used, not in a file outside the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = [f for f in tracked if f != "tests/test_footguns.py" and (ROOT / f).is_file()
                 and "DALLE_FACTS" in (ROOT / f).read_text(errors="replace")]
    assert not offenders


@pytest.mark.parametrize("overrides, fragment", [
    ({"distributed.zero_stage": 2}, "zero_stage 0 or 1, not 2"),
    ({"distributed.zero_stage": 3, "precision.mode": "fp16_per_resblock"}, "zero_stage 0 or 1, not 3"),
    ({"distributed.zero_stage": 1, "precision.mode": "fp16"}, "does not work with precision.mode=fp16"),
])
def test_powersgd_limits_are_refused_when_the_config_is_read(overrides, fragment):
    """Before DeepSpeed starts, not deep inside it."""
    with pytest.raises(ConfigError, match=fragment):
        load_config("tiny", None, {"distributed.powersgd.enabled": True, **overrides})
    load_config("tiny", None, {"distributed.powersgd.enabled": True, "distributed.zero_stage": 1})
