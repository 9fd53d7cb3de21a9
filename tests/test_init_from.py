"""`--init-from DIR`: fine-tuning from exported weights on real DeepSpeed engines (gloo, CPU).

The fine-tune's first logged loss is the loss of step 1, computed before any update, so it must
equal the exported model's loss on the first batch the trainer reads; the tests compute that loss
independently, from the export and the data stream, at 1 and 2 ranks and ZeRO stages other than
the one the weights were trained with. A run folder with a checkpoint resumes instead, and bad
inputs are one-line messages (exit code 2).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadalle import cli
from megadalle.config import Config, load_config
from sample_run import SMALL, build_random_run
from trainer_toy import losses

torch.set_num_threads(1)
BIN = Path(sys.executable).parent
FLAGS = [f"--{k}={v}" for k, v in SMALL.items()]
TRAIN = ["--logging.progress", "false", "--logging.tensorboard", "false", "--train.synthetic_data", "true",
         "--train.micro_batch_size", "2", "--train.log_every", "1", "--train.eval_every", "0",
         "--train.schedule.warmup_steps", "1"]


def _train(run_dir: Path, *extra: str) -> int:
    return cli.main(["train", "--preset", "tiny", *FLAGS, "--logging.run_dir", str(run_dir), *TRAIN, *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A transformer trained 2 steps at ZeRO-0 on 1 rank, exported with `megadalle export` (with a
    dVAE and a reranker initialised from another seed than the trainers use)."""
    from megadalle.clip.model import ClipGeometry, ClipModel, save_clip
    from megadalle.dvae.io import save_dvae
    from megadalle.dvae.model import DiscreteVAE

    root = tmp_path_factory.mktemp("init_from")
    cfg = build_random_run(root / "run")  # the tokenizer, dVAE and reranker the export needs
    torch.manual_seed(1)
    save_dvae(DiscreteVAE(cfg.dvae), cfg.dvae, root / "run" / "dvae")
    save_clip(ClipModel(cfg.clip, ClipGeometry(300, 24, 32)), root / "run" / "clip")
    # No EMA (the export is the trained weights) and a large lr: the export is far from any init.
    assert _train(root / "run", "--train.steps", "2", "--distributed.zero_stage", "0", "--train.ema_decay", "0",
                  "--train.optimizer.lr", "1e-2") == 0
    assert cli.main(["export", str(root / "run"), "--out", str(root / "exported")]) == 0
    return root / "exported"


@torch.no_grad()
def _export_loss(export: Path, world: int) -> float:
    """The exported transformer's loss on the first synthetic batch of every rank, averaged over
    ranks as the trainer logs it (micro batch 2, train.seed 0)."""
    from megadalle.generate.load import load_run_config, load_transformer
    from megadalle.training.transformer_trainer import SyntheticTokens

    cfg = load_run_config(export / "transformer")
    model = load_transformer(export / "transformer", cfg)
    per_rank = []
    for rank in range(world):
        batch = next(iter(SyntheticTokens(cfg.transformer, 2, rank, world, seed=0)))
        per_rank.append(float(model.loss(batch["text"], batch["codes"])["loss"]))
    return sum(per_rank) / world


def test_the_export_is_not_what_a_new_run_starts_from(exported, tmp_path):
    """Guards the tests below: a run without --init-from has another first loss."""
    assert _train(tmp_path, "--train.steps", "1") == 0
    assert losses(tmp_path, "transformer")[1] != pytest.approx(_export_loss(exported, 1), rel=1e-3)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("zero, source", [(1, "export"), (3, "stage folder")])
def test_one_rank_starts_from_the_exported_weights(exported, tmp_path, zero, source, capsys):
    # The run's own transformer/ folder holds the same file the export copied.
    src = exported if source == "export" else exported.parent / "run" / "transformer"
    assert _train(tmp_path, "--train.steps", "2", "--distributed.zero_stage", str(zero), "--init-from", str(src)) == 0
    out = capsys.readouterr().out
    assert "trained to step 2 (2 steps this run, started from the weights in" in out
    got = losses(tmp_path, "transformer")
    assert sorted(got) == [1, 2]  # a new step count
    assert got[1] == pytest.approx(_export_loss(exported, 1), rel=1e-5)
    assert Config.load(tmp_path / "transformer" / "config.yaml").checkpoint.init_from == str(src)


def _launch_two_ranks(run_dir: Path, repo_root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--no_local_rank", "--master_port", str(_port()),
           "--module", "megadalle", "train", "--preset", "tiny", *FLAGS, "--logging.run_dir", str(run_dir), *TRAIN,
           *extra]
    return subprocess.run(cmd, cwd=repo_root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("zero", [1, 3])
def test_two_ranks_start_from_the_exported_weights(exported, tmp_path, repo_root, zero):
    proc = _launch_two_ranks(tmp_path, repo_root, "--train.steps", "2", "--distributed.zero_stage", str(zero),
                             "--init-from", str(exported))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = losses(tmp_path, "transformer")
    assert sorted(got) == [1, 2]
    # Both ranks' halves of the first global batch give the export's loss: every rank started from it.
    assert got[1] == pytest.approx(_export_loss(exported, 2), rel=1e-5)


def test_two_ranks_stop_together_on_weights_that_do_not_fit(exported, tmp_path, repo_root):
    proc = _launch_two_ranks(tmp_path, repo_root, "--train.steps", "1", "--distributed.zero_stage", "3",
                             "--init-from", str(exported), "--transformer.dim", "64", "--transformer.head_dim", "32")
    assert proc.returncode != 0
    assert "does not fit the model this run configures" in proc.stdout + proc.stderr


def test_a_checkpoint_to_resume_wins(exported, tmp_path, capsys):
    init = ["--init-from", str(exported), "--checkpoint.every_steps", "1"]
    assert _train(tmp_path, "--train.steps", "2", *init) == 0
    first = losses(tmp_path, "transformer")
    capsys.readouterr()
    assert _train(tmp_path, "--train.steps", "3", *init) == 0
    out = capsys.readouterr().out
    assert "--init-from" in out and "is ignored" in out and "resumed from" in out and "started from" not in out
    again = losses(tmp_path, "transformer")
    assert sorted(again) == [1, 2, 3] and again[1] == first[1] and again[2] == first[2]


def _image_flags(run_dir: Path, exported: Path) -> list[str]:
    """1 rank, shapes data at the export's 32 px, no shuffling: the first batch is known."""
    return ["--preset", "tiny", *FLAGS, "--logging.run_dir", str(run_dir), "--logging.progress", "false",
            "--logging.tensorboard", "false", "--data.shapes.n_train", "8", "--data.shapes.n_val", "4",
            "--data.shapes.n_heldout", "0", "--data.shuffle_buffer", "0",
            "--tokenizer.path", str(exported / "tokenizer.json"), "--init-from", str(exported)]


def test_dvae_and_reranker_start_from_the_exported_weights(exported, tmp_path):
    from megadalle.clip.model import ClipModel, load_clip
    from megadalle.data.loader import image_loader_from_config
    from megadalle.dvae import load_dvae
    from megadalle.dvae.loss import per_sample_gumbel
    from megadalle.dvae.model import DiscreteVAE
    from megadalle.dvae.schedules import DVAESchedules
    from megadalle.generate.load import load_tokenizer
    from megadalle.training.sample_seeds import sample_seed

    flags = _image_flags(tmp_path, exported)
    assert cli.main(["train-dvae", *flags, "--check-images", "0", "--dvae_train.steps", "1",
                     "--dvae_train.micro_batch_size", "4", "--dvae_train.eval_every", "0",
                     "--dvae_train.sample_every", "0"]) == 0
    assert cli.main(["train-clip", *flags, "--steps", "1", "--clip_train.micro_batch_size", "4",
                     "--clip_train.eval_every", "0"]) == 0
    cfg = load_config("tiny", None, {**SMALL, "logging.run_dir": str(tmp_path), "data.shuffle_buffer": 0,
                                     "data.shapes.n_train": 8, "data.shapes.n_val": 4, "data.shapes.n_heldout": 0,
                                     "tokenizer.path": str(exported / "tokenizer.json")})
    batch = next(iter(image_loader_from_config(cfg, 4, "train", rank=0, world_size=1)))
    with torch.no_grad():
        vae = load_dvae(exported / "dvae")
        g, schedules = cfg.dvae.grid_size, DVAESchedules.from_config(cfg.dvae, cfg.dvae_train)
        noise = per_sample_gumbel((cfg.dvae.vocab_size, g, g), [sample_seed(0, 0, k) for k in batch["key"]])
        want_dvae = float(vae.loss(batch["image"], schedules.tau(0), schedules.beta(0), noise)["loss"])
        clip = load_clip(exported / "clip")
        want_clip = float(clip(batch["image"], load_tokenizer(cfg).encode(batch["caption"]))["loss"])
        # Guards: the trainers' own initialisation (their seed 0) has other losses.
        torch.manual_seed(0)
        assert float(DiscreteVAE(cfg.dvae).loss(batch["image"], schedules.tau(0), schedules.beta(0), noise)["loss"]) \
            != pytest.approx(want_dvae, rel=1e-3)
        torch.manual_seed(0)
        fresh_clip = ClipModel(cfg.clip, clip.geometry)
        assert float(fresh_clip(batch["image"], load_tokenizer(cfg).encode(batch["caption"]))["loss"]) \
            != pytest.approx(want_clip, rel=1e-3)
    assert losses(tmp_path, "dvae")[1] == pytest.approx(want_dvae, rel=1e-5)
    assert losses(tmp_path, "clip")[1] == pytest.approx(want_clip, rel=1e-5)


def test_bad_inputs_are_messages(exported, tmp_path, capsys):
    from megadalle.data.tokenizer import TextTokenizer
    from megadalle.dvae.io import save_dvae
    from megadalle.dvae.model import DiscreteVAE

    def refused(run: str, *extra: str) -> str:
        capsys.readouterr()
        assert _train(tmp_path / run, "--train.steps", "1", *extra) == 2
        return capsys.readouterr().err

    assert "no such folder" in refused("a", "--init-from", str(tmp_path / "nothing"))
    err = refused("b", "--init-from", str(exported / "dvae"))
    assert "holds no transformer weights" in err and "transformer/transformer.safetensors" in err
    # Another width: the first mismatching parameter with both shapes, and the settings to use.
    err = refused("c", "--init-from", str(exported), "--transformer.dim", "64", "--transformer.head_dim", "32")
    assert "has shape [" in err and "in the file and [" in err and "--transformer.dim 32" in err
    broken = tmp_path / "broken"
    shutil.copytree(exported / "transformer", broken / "transformer")
    weights = broken / "transformer" / "transformer.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "is not a readable safetensors file" in refused("d", "--init-from", str(broken))
    # Captions: another tokenizer of the same size would give the words other ids.
    other = tmp_path / "other_tokenizer.json"
    TextTokenizer.train(["a blue square", "the red circle"], vocab_size=300, text_len=24, min_frequency=1).save(other)
    on_captions = ["--train.synthetic_data", "false", "--init-from", str(exported)]
    assert f"no tokenizer at {tmp_path / 'e' / 'tokenizer.json'}" in refused("e", *on_captions)
    err = refused("e", *on_captions, "--tokenizer.path", str(other))
    assert "trained with the tokenizer" in err and f"--tokenizer.path {exported / 'tokenizer.json'}" in err
    # The run's dVAE makes other codes than the transformer learnt (the check sampling makes).
    dcfg = load_config("tiny", None, {**SMALL, "dvae.vocab_size": 32, "transformer.image_vocab_size": 32}).dvae
    save_dvae(DiscreteVAE(dcfg), dcfg, tmp_path / "f" / "dvae")
    err = refused("f", *on_captions, "--tokenizer.path", str(exported / "tokenizer.json"))
    assert "has 32 codes but the transformer's image vocabulary is 64" in err
    assert "Traceback" not in capsys.readouterr().err
