"""Per-stage precision (`<stage>.precision`): one config holds a transformer in one precision and a
dVAE and reranker in another. `Config.for_stage` is what each stage trainer works on; the tests
build each stage's DeepSpeed config and precision machinery from it, and train the real dVAE and
transformer trainers for two steps each."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from megadalle.cli import main
from megadalle.clip.model import ClipGeometry, ClipModel
from megadalle.config import TRAIN_SECTIONS, Config, ConfigError, load_config
from megadalle.distributed.engine import install_precision, resolve_ds_config
from megadalle.distributed.resblock_scaling import ResblockScaler
from megadalle.dvae.model import DiscreteVAE
from megadalle.training.dvae_trainer import DVAETrainer
from megadalle.training.transformer_trainer import TransformerTrainer
from megadalle.transformer.model import DALLETransformer


def _stage_models(cfg: Config) -> dict[str, torch.nn.Module]:
    tiny = load_config("tiny")  # install_precision looks at the model's structure, not its size
    with torch.device("meta"):
        return {"dvae_train": DiscreteVAE(cfg.dvae),
                "train": DALLETransformer(tiny.transformer),
                "clip_train": ClipModel(tiny.clip, ClipGeometry(512, 32, 48))}


def _modes(cfg: Config) -> dict[str, tuple[str, bool]]:
    return {s: (cfg.precision_for(s).mode, cfg.precision_for(s).bf16_state) for s in TRAIN_SECTIONS}


@pytest.mark.parametrize("overrides", [{}, {"precision.mode": "fp16_per_resblock", "precision.bf16_state": False}],
                         ids=["12b", "12b-fp16_per_resblock"])
def test_12b_every_stage_starts_in_its_own_precision(overrides):
    cfg = load_config("12b", None, overrides)
    transformer_mode = overrides.get("precision.mode", "bf16")
    assert _modes(cfg) == {"dvae_train": ("bf16", False), "train": (transformer_mode, not overrides),
                           "clip_train": ("bf16", False)}
    models = _stage_models(cfg)
    for section in TRAIN_SECTIONS:
        view = cfg.for_stage(section)
        assert view.precision == cfg.precision_for(section)
        # The copy a stage saves in its folder loads back to the same precision for every stage.
        assert _modes(Config.from_dict(yaml.safe_load(view.to_yaml()))) == _modes(cfg)
        ds = resolve_ds_config(view, getattr(view, section), 1024, section=section)
        assert ds["bf16"]["enabled"] == (view.precision.mode == "bf16")
        assert ds["bf16"].get("bf16_master_weights_and_grads", False) == view.precision.bf16_state
        assert ds["fp16"] == {"enabled": False}
        hook = install_precision(models[section], view)
        assert isinstance(hook, ResblockScaler) == (view.precision.mode == "fp16_per_resblock")
    assert cfg.for_stage("train") is cfg  # the transformer runs in the shared section


def test_no_stage_override_keeps_the_shared_precision():
    for cfg in (Config(), load_config("tiny"), load_config("small", None, {"precision.mode": "fp32"})):
        assert all(cfg.for_stage(s) is cfg and cfg.precision_for(s) is cfg.precision for s in TRAIN_SECTIONS)
    # Setting a stage to the shared values changes nothing either.
    cfg = load_config("tiny", None, {"dvae_train.precision.mode": "fp32"})
    assert cfg.for_stage("dvae_train") is cfg


@pytest.mark.parametrize("overrides, fragment", [
    ({"dvae_train.precision.mode": "fp8"}, "dvae_train.precision.mode='fp8': choose fp32, bf16, fp16"),
    ({"dvae_train.precision.bf16_state": True}, "dvae_train.precision.bf16_state=true needs "
                                                "dvae_train.precision.mode=bf16 as well"),
    ({"dvae_train.precision.mode": "fp32", "dvae_train.precision.bf16_state": True},
     "it needs dvae_train.precision.mode=bf16 (it is fp32)"),
    ({"clip_train.precision.mode": "bf16", "clip_train.precision.bf16_state": True},
     "clip_train.precision.bf16_state=true is a ZeRO optimizer option"),
    ({"distributed.powersgd.enabled": True, "distributed.zero_stage": 1, "train.precision.mode": "fp16"},
     "train.precision.mode=fp16 (this stage's precision.mode): distributed.powersgd.enabled=true does not"),
    ({"dvae_train.precision": "bf16"}, "dvae_train.precision is a section"),
])
def test_bad_stage_precision_is_refused_by_key(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", None, {"precision.mode": "fp32", **overrides})
    assert fragment in str(e.value)


def test_fp16_per_resblock_on_a_stage_without_resblocks_is_refused_when_it_starts():
    cfg = load_config("12b", None, {"precision.mode": "fp16_per_resblock", "precision.bf16_state": False,
                                    "dvae_train.precision.mode": ""})
    assert cfg.for_stage("train") is cfg  # other commands still load this config
    with pytest.raises(ConfigError) as e:
        cfg.for_stage("dvae_train")
    assert "(which dvae_train inherits)" in str(e.value) and "--dvae_train.precision.mode=bf16" in str(e.value)
    # Set explicitly on a stage without resblocks: refused by the same check, naming the stage's key.
    cfg = load_config("tiny", None, {"clip_train.precision.mode": "fp16_per_resblock"})
    with pytest.raises(ConfigError) as e:
        cfg.for_stage("clip_train")
    assert str(e.value).startswith("clip_train.precision.mode=fp16_per_resblock: per-resblock gradient scaling")
    with pytest.raises(ConfigError, match="unknown training section"):
        cfg.precision_for("dvae")


def test_print_config_shows_each_stage_precision(capsys):
    assert main(["train-dvae", "--preset", "12b", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["dvae_train"]["precision"] == {"mode": "bf16", "bf16_state": False}
    assert printed["train"]["precision"] == {"mode": "", "bf16_state": False}
    assert printed["precision"]["mode"] == "bf16" and printed["precision"]["bf16_state"] is True
    assert _modes(Config.from_dict(printed)) == _modes(load_config("12b"))


# 16 px shapes -> 4x4 tokens from 32 codes (as tests/test_dvae_trainer.py), a 2-layer transformer.
SMALL = {
    "precision.mode": "fp16_per_resblock", "dvae_train.precision.mode": "bf16",
    "data.image_size": 16, "dvae.image_size": 16, "dvae.n_hid": 8, "dvae.n_init": 8, "dvae.vocab_size": 32,
    "dvae.group_count": 3, "transformer.image_grid": 4, "transformer.image_vocab_size": 32,
    "transformer.depth": 2, "transformer.dim": 64, "transformer.heads": 2,
    "data.shapes.n_train": 16, "data.shapes.n_val": 8, "data.shapes.n_heldout": 8,
    "data.shapes.samples_per_shard": 64, "data.shuffle_buffer": 0,
    "dvae_train.steps": 2, "dvae_train.micro_batch_size": 4, "dvae_train.log_every": 1,
    "train.steps": 2, "train.micro_batch_size": 2, "train.log_every": 1, "train.synthetic_data": True,
    "checkpoint.every_steps": 2, "logging.progress": False, "logging.tensorboard": False,
    # As the 12b preset: on for the transformer's resblocks; the dVAE has none and trains without it.
    "distributed.activation_checkpointing": True,
}


def test_tiny_fp16_per_resblock_transformer_beside_a_bf16_dvae_trains(tmp_path):
    cfg = load_config("tiny", None, {**SMALL, "logging.run_dir": str(tmp_path)})
    dvae = DVAETrainer(cfg, check_images=0)
    assert dvae.train().final_step == 2
    assert dvae.engine.bfloat16_enabled() and dvae.gradient_hook is None
    transformer = TransformerTrainer(cfg)
    summary = transformer.train()
    assert summary.final_step == 2 and summary.skipped_steps == 0
    assert isinstance(transformer.gradient_hook, ResblockScaler) and not transformer.engine.bfloat16_enabled()
    for stage, mode in (("dvae", "bf16"), ("transformer", "fp16_per_resblock")):
        meta = json.loads((tmp_path / stage / "checkpoints" / "step_00000002" / "meta.json").read_text())
        assert meta["precision"] == mode
        # Each stage folder's config loads back with every stage's precision as given.
        assert _modes(Config.load(tmp_path / stage / "config.yaml")) == _modes(cfg)
