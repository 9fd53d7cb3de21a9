"""The generated DeepSpeed JSON: checked-in examples, hand-written configs, batch arithmetic."""

from __future__ import annotations

import json

import pytest

from megadalle.config import ConfigError, load_config
from megadalle.distributed.ds_config import (EXAMPLES, build_ds_config, example_config, load_user_config,
                                             merge_user_config)
from megadalle.distributed.engine import init_distributed, resolve_ds_config


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_checked_in_examples_match_the_generator(repo_root, name):
    path = repo_root / "ds_configs" / name
    assert path.is_file(), f"{path} missing: run python -m megadalle.distributed.ds_config ds_configs"
    checked_in = json.loads(path.read_text())
    cfg = example_config(name)
    assert checked_in == build_ds_config(cfg, cfg.train, None)
    # A hand-written copy of the example passes the conflict check unchanged.
    assert merge_user_config(build_ds_config(cfg, cfg.train, 1), checked_in) == build_ds_config(cfg, cfg.train, 1)


def test_every_example_is_in_the_table(repo_root):
    assert {p.name for p in (repo_root / "ds_configs").glob("*.json")} == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_deepspeed_accepts_examples(repo_root, name):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = example_config(name)
    init_distributed(cfg.distributed)
    ds = DeepSpeedConfig(json.loads((repo_root / "ds_configs" / name).read_text()))
    assert ds.zero_optimization_stage == cfg.distributed.zero_stage
    assert ds.bfloat16_config.enabled == (cfg.precision.mode == "bf16")
    # fp16_per_resblock keeps DeepSpeed in fp32 (each resblock scales its own fp16 gradients).
    assert ds.float16_config.enabled == (cfg.precision.mode == "fp16")
    assert ds.train_batch_size == cfg.train.micro_batch_size * cfg.train.grad_accum_steps


def test_generated_fields_follow_the_typed_config():
    cfg = load_config("tiny", None, {"train.grad_accum_steps": 3, "train.optimizer.grad_clip": 2.5,
                                     "distributed.zero_stage": 2, "precision.mode": "bf16"})
    ds = build_ds_config(cfg, cfg.train, 4)
    assert ds["train_batch_size"] == 32 * 3 * 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 2.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "optimizer" not in ds and "scheduler" not in ds


def test_batch_arithmetic_is_checked():
    cfg = load_config("tiny", None, {"train.global_batch_size": 100})
    with pytest.raises(ConfigError, match="global_batch_size=100 but micro_batch_size x grad_accum_steps"):
        build_ds_config(cfg, cfg.train, 2)
    user = {"train_batch_size": 48}
    cfg = load_config("tiny", None, {})
    with pytest.raises(ConfigError, match="train_batch_size=48 but the typed config gives 64"):
        merge_user_config(build_ds_config(cfg, cfg.train, 2), user)


def test_conflicts_with_hand_written_json_are_errors():
    cfg = load_config("tiny", None, {"distributed.zero_stage": 1})
    gen = build_ds_config(cfg, cfg.train, 1)
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=3 but the typed config gives 1 \(from distributed.zero_stage\)"):
        merge_user_config(gen, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError, match="bf16.enabled=True but the typed config gives False"):
        merge_user_config(gen, {"bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="offload_optimizer.device='cpu' but the typed config gives 'none'"):
        merge_user_config(gen, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ConfigError, match="'auto'"):
        merge_user_config(gen, {"train_micro_batch_size_per_gpu": "auto"})
    # Keys only DeepSpeed decides are taken as given; agreeing typed keys are fine.
    merged = merge_user_config(gen, {"zero_optimization": {"stage": 1, "reduce_bucket_size": 12345}})
    assert merged["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 12345}


@pytest.mark.parametrize("key", ["optimizer", "scheduler"])
def test_optimizer_or_scheduler_given_twice_is_an_error(key):
    cfg = load_config("tiny", None, {})
    with pytest.raises(ConfigError, match=f"'{key}' section.*twice"):
        merge_user_config(build_ds_config(cfg, cfg.train, 1), {key: {"type": "Adam"}})


def test_bad_json_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_user_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_user_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_user_config(bad)


def test_fp16_on_cpu_is_refused_with_a_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on GPUs")
    cfg = load_config("tiny", None, {"precision.mode": "fp16"})
    with pytest.raises(ConfigError, match="refuses fp16.*bf16"):
        resolve_ds_config(cfg, cfg.train, 1)
