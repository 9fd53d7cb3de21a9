"""ClipTrainer on the shared Trainer base: a real DeepSpeed engine on real shapes shards."""

import sys
from pathlib import Path

import torch

from megadalle.cli import main
from megadalle.clip.model import load_clip
from megadalle.data.shapes import ShapesDataset
from megadalle.data.tokenizer import TextTokenizer
from megadalle.training.clip_trainer import ClipTrainer

sys.path.insert(0, str(Path(__file__).parent))
from sample_run import small_config  # noqa: E402

torch.set_num_threads(1)
SHAPES = {"data.shapes.n_train": 384, "data.shapes.n_val": 64, "data.shapes.n_heldout": 16,
          "data.shapes.samples_per_shard": 128, "data.shuffle_buffer": 128,
          "clip_train.micro_batch_size": 32, "clip_train.steps": 40, "clip_train.eval_batches": 2,
          "clip_train.optimizer.lr": 2e-3, "clip_train.schedule.warmup_steps": 4,
          "checkpoint.every_steps": 20, "logging.tensorboard": False, "logging.progress": False}


def _cfg(run_dir, **more):
    cfg = small_config(run_dir, **{**SHAPES, **more})
    ds = ShapesDataset("train")
    TextTokenizer.from_config([ds.sample(i).caption for i in range(400)], cfg.tokenizer).save(run_dir / "tokenizer.json")
    return cfg


def test_clip_training_reduces_contrastive_loss_on_shapes(tmp_path):
    cfg = _cfg(tmp_path)
    trainer = ClipTrainer(cfg)
    trainer.setup()
    before = trainer.evaluate()["val_loss"]
    summary = trainer.train()
    after = trainer.evaluate()
    assert summary.final_step == 40
    assert after["val_loss"] < 0.8 * before, (before, after)
    assert after["val_accuracy"] > 2 / 32  # better than chance within a batch of 32
    # The export is the reranker `sample` loads, with the trained weights.
    model = load_clip(tmp_path / "clip")
    live = dict(trainer.engine.module.named_parameters())
    assert all(torch.equal(v, live[k].detach()) for k, v in model.state_dict().items())


def test_train_clip_command_resumes_and_reports_missing_tokenizer(tmp_path, capsys):
    cfg = _cfg(tmp_path, **{"clip_train.steps": 4, "checkpoint.every_steps": 2})
    cfg_file = cfg.save(tmp_path / "c.yaml")
    assert main(["train-clip", "--config", str(cfg_file)]) == 0
    assert main(["train-clip", "--config", str(cfg_file), "--steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000004" in out and "trained to step 6" in out
    (tmp_path / "tokenizer.json").unlink()
    assert main(["train-clip", "--config", str(cfg_file)]) == 2
    assert "tokenizer train" in capsys.readouterr().err
