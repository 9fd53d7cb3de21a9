"""`megadalle train` end to end in one process: real token shards and tokenizer on disk,
validation feeding the plateau schedule, resume, hand-written DeepSpeed JSON, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megadalle import cli
from megadalle.training.metrics import read_jsonl
from trainer_toy import write_token_run


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as `megadalle encode` and `megadalle tokenizer` leave it (tiny geometry)."""
    root = write_token_run(tmp_path_factory.mktemp("run"))
    # An untrained dVAE of the tiny geometry: enough to decode sample grids.
    from megadalle.config import load_config
    from megadalle.dvae.io import save_dvae
    from megadalle.dvae.model import DiscreteVAE

    dcfg = load_config("tiny").dvae
    save_dvae(DiscreteVAE(dcfg), dcfg, root / "dvae")
    return root


def _train(run_dir, *extra: str) -> int:
    return cli.main(["train", "--preset", "tiny", "--logging.run_dir", str(run_dir), "--logging.progress", "false",
                     "--logging.tensorboard", "false", "--train.micro_batch_size", "2", "--checkpoint.every_steps",
                     "2", "--train.log_every", "1", *extra])


def test_train_on_token_shards_with_validation_and_resume(run_folder, capsys):
    args = ["--train.eval_every", "2", "--train.eval_batches", "2", "--tokenizer.bpe_dropout", "0.1",
            "--train.schedule.kind", "warmup_plateau", "--train.schedule.plateau_patience", "1",
            "--train.sample_every", "4"]
    assert _train(run_folder, "--train.steps", "4", *args) == 0
    out = capsys.readouterr().out
    assert "trained to step 4 (4 steps this run" in out and "transformer.safetensors" in out
    folder = run_folder / "transformer"
    assert (folder / "transformer.safetensors").is_file() and (folder / "transformer.yaml").is_file()
    records = read_jsonl(folder / "metrics.jsonl")
    assert any("val_loss" in r and "val_image_loss" in r for r in records)
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert (folder / "samples" / "step_00000004.png").is_file()
    # Resume (the default) continues from step 4 with the data position of every rank.
    assert _train(run_folder, "--train.steps", "6", *args) == 0
    assert "trained to step 6 (2 steps this run, resumed from" in capsys.readouterr().out
    # The exported weights load into the sampler's loader.
    from megadalle.generate.load import load_run_config, load_transformer

    cfg = load_run_config(folder)
    model = load_transformer(folder, cfg)
    from safetensors.torch import load_file

    saved = load_file(str(folder / "transformer.safetensors"))
    params = {k: p.detach() for k, p in model.named_parameters()}
    assert params.keys() == saved.keys() and all(params[k].equal(saved[k]) for k in saved)


def test_hand_written_deepspeed_json(run_folder, tmp_path, repo_root, capsys):
    user = json.loads((repo_root / "ds_configs" / "zero1_bf16.json").read_text())
    user["zero_optimization"]["reduce_bucket_size"] = 1_000_000
    user["train_micro_batch_size_per_gpu"] = 2  # the example is for micro batch 32
    good = tmp_path / "good.json"
    good.write_text(json.dumps(user))
    common = ["--train.synthetic_data", "true", "--train.steps", "2", "--precision.mode", "bf16",
              "--deepspeed_config", str(good)]
    assert _train(tmp_path / "ok", "--distributed.zero_stage", "1", *common) == 0
    capsys.readouterr()
    # The same JSON with a typed config that disagrees: an error naming both sides, exit 2.
    assert _train(tmp_path / "conflict", "--distributed.zero_stage", "2", *common) == 2
    err = capsys.readouterr().err
    assert "zero_optimization.stage=1 but the typed config gives 2 (from distributed.zero_stage)" in err
    user["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3}}
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps(user))
    assert _train(tmp_path / "twice", "--distributed.zero_stage", "1", *common[:-1], str(twice)) == 2
    assert "'optimizer' section" in capsys.readouterr().err


def test_missing_inputs_are_reported(tmp_path, run_folder, capsys):
    assert _train(tmp_path / "empty", "--train.steps", "1") == 2
    assert "no token shards" in capsys.readouterr().err
    assert _train(tmp_path / "notok", "--train.steps", "1", "--data.token_source", str(run_folder / "tokens")) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert _train(tmp_path / "fp16", "--train.steps", "1", "--train.synthetic_data", "true",
                  "--precision.mode", "fp16") == 2
    assert "refuses fp16" in capsys.readouterr().err


def test_a_second_trainer_after_closing_the_process_group(tmp_path):
    from megadalle.distributed.engine import close_distributed
    from trainer_toy import ToyTrainer, toy_config

    ToyTrainer(toy_config(tmp_path / "a", **{"train.steps": 1, "distributed.zero_stage": 1})).train()
    close_distributed()
    assert ToyTrainer(toy_config(tmp_path / "b", **{"train.steps": 1, "distributed.zero_stage": 1})).train().final_step == 1


def test_resume_on_token_shards_is_bit_identical(run_folder, tmp_path):
    """The loader's position (shuffle buffer included) survives the checkpoint, and BPE dropout is
    drawn from (seed, update, sample key): a stopped and resumed run repeats the uninterrupted
    run's losses exactly, with the paper's BPE dropout on."""
    from trainer_toy import losses

    data = ["--data.token_source", str(run_folder / "tokens"), "--tokenizer.path", str(run_folder / "tokenizer.json"),
            "--data.shuffle_buffer", "8", "--checkpoint.every_steps", "3"]
    dropout = ["--tokenizer.bpe_dropout", "0.3"]
    assert _train(tmp_path / "full", "--train.steps", "6", *data, *dropout) == 0
    assert _train(tmp_path / "split", "--train.steps", "3", *data, *dropout) == 0
    assert _train(tmp_path / "split", "--train.steps", "6", *data, *dropout) == 0
    assert _train(tmp_path / "plain", "--train.steps", "6", *data, "--tokenizer.bpe_dropout", "0") == 0
    full, split = losses(tmp_path / "full", "transformer"), losses(tmp_path / "split", "transformer")
    assert sorted(full) == list(range(1, 7)) and full == split
    assert losses(tmp_path / "plain", "transformer") != full  # the dropout was really on


def test_every_evaluation_sees_the_same_validation_batches(run_folder, tmp_path):
    from megadalle.config import load_config
    from megadalle.training.transformer_trainer import TransformerTrainer

    cfg = load_config("tiny", None, {"logging.run_dir": str(tmp_path), "data.token_source": str(run_folder / "tokens"),
                                     "tokenizer.path": str(run_folder / "tokenizer.json"), "train.eval_every": 1,
                                     "train.eval_batches": 2, "train.micro_batch_size": 2, "logging.progress": False})
    trainer = TransformerTrainer(cfg)
    trainer.setup()
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["val_loss"] > 0 and first == second


@pytest.mark.parametrize("predict_padding", [True, False])
def test_trainer_loss_equals_the_models_own_loss(predict_padding):
    """The trainer computes the loss from the engine's forward (ZeRO-3 needs the forward to run
    through the engine); it must equal DALLETransformer.loss."""
    import torch

    from megadalle.config import load_config
    from megadalle.training.transformer_trainer import dalle_loss
    from megadalle.transformer.model import DALLETransformer

    cfg = load_config("tiny", None, {"transformer.predict_padding": predict_padding}).transformer
    torch.manual_seed(0)
    model = DALLETransformer(cfg)
    text = torch.randint(1, cfg.text_vocab_size, (3, cfg.text_len))
    text[:, 10:] = 0
    codes = torch.randint(0, cfg.image_vocab_size, (3, cfg.image_len))
    ours = dalle_loss(cfg, text, codes, *model(text, codes))
    theirs = model.loss(text, codes)
    assert all(torch.equal(ours[k], theirs[k]) for k in ("loss", "text_loss", "image_loss"))


def test_the_plateau_schedule_without_validation_tokens_is_refused(run_folder, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_folder / "tokens" / "train", run / "tokens" / "train")
    rc = _train(run, "--train.steps", "1", "--tokenizer.path", str(run_folder / "tokenizer.json"),
                "--train.schedule.kind", "warmup_plateau", "--train.eval_every", "2")
    assert rc == 2
    assert "warmup_plateau needs validation tokens" in capsys.readouterr().err
