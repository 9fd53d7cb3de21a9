"""The dVAE trainer on real DeepSpeed engines (gloo, CPU): exact resume, 2 ranks = 1 rank,
EMA export loadable by `load_dvae`, metrics and sample grids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megadalle.config import load_config
from megadalle.data.loader import image_loader_from_config
from megadalle.dvae import load_dvae
from megadalle.training.dvae_trainer import DVAETrainer, noise_seed, reconstruction_agreement
from megadalle.training.metrics import read_jsonl

# 16 px shapes -> 4x4 tokens from 32 codes; one shard and no shuffle, so that every rank layout
# reads the same global batches (the loader interleaves samples over ranks).
SMALL = {
    "data.image_size": 16, "dvae.image_size": 16, "dvae.n_hid": 8, "dvae.n_init": 8, "dvae.vocab_size": 32,
    "dvae.group_count": 3, "transformer.image_grid": 4, "transformer.image_vocab_size": 32,
    "data.shapes.n_train": 48, "data.shapes.n_val": 8, "data.shapes.n_heldout": 8,
    "data.shapes.samples_per_shard": 64, "data.shuffle_buffer": 0,
    "dvae_train.steps": 4, "dvae_train.micro_batch_size": 4, "dvae_train.log_every": 1,
    "dvae_train.sample_every": 2, "checkpoint.every_steps": 2, "logging.progress": False,
    "dvae.kl_warmup_fraction": 0.5, "dvae.temperature_anneal_fraction": 0.5,
}


def small_config(run_dir: Path, **over):
    return load_config("tiny", None, {**SMALL, "logging.run_dir": str(run_dir), **over})


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for rec in read_jsonl(run_dir / "dvae" / "metrics.jsonl"):
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvae_full")
    trainer = DVAETrainer(small_config(root / "run"), check_images=8)
    summary = trainer.train()
    return root, trainer, summary


def test_trains_logs_and_exports_ema(full_run):
    root, trainer, summary = full_run
    run = root / "run" / "dvae"
    assert summary.final_step == 4
    records = read_jsonl(run / "metrics.jsonl")
    keys = set().union(*records)
    for k in ("loss", "rec", "kl", "beta", "tau", "lr", "psnr", "codebook_perplexity", "dead_codes"):
        assert k in keys, k
    taus = [r["tau"] for r in records if "tau" in r]
    assert taus[0] == 1.0 and taus[-1] == pytest.approx(1 / 16)  # annealed over half of the 4 steps
    assert list((run / "samples").glob("recon_*.png"))
    assert list((run / "tb").glob("events.*"))
    assert "reconstruction check" in summary.written
    # Both unseen images of seen (shape, colour) pairs and images of held-out pairs are checked.
    assert trainer.check["images"] == 8 and trainer.check["images_heldout"] == 8
    assert "held-out (shape, colour) pairs" in summary.written["reconstruction check"]
    # The export is the EMA, in the dVAE folder format.
    model = load_dvae(run)
    # The check's figures, recomputed image by image from the exported EMA weights.
    for split, suffix in (("val", ""), ("heldout", "_heldout")):
        agree, psnr = recompute_check(model, small_config(root / "run"), split)
        assert len(agree) == 8
        assert trainer.check[f"facts_agree{suffix}"] == sum(agree) / 8, (split, agree)
        assert trainer.check[f"psnr{suffix}"] == pytest.approx(psnr, rel=1e-5)
    ema = load_file(str(run / "dvae.safetensors"))
    live = {k: v.detach() for k, v in trainer.engine.module.named_parameters()}
    assert set(ema) == set(live) and any(not torch.equal(ema[k], live[k]) for k in ema)
    assert torch.equal(model.state_dict()["encoder.blocks.input.w"], ema["encoder.blocks.input.w"])
    assert model.cfg == trainer.cfg.dvae


def recompute_check(model, cfg, split: str) -> tuple[list[bool], float]:
    """Per image of the first 8 of `split`: do the reconstruction's facts equal the original's?
    And the mean PSNR. The analyser must tell an image from a blank one, or agreement means nothing."""
    from megadalle.data.shapes import analyse, compare

    loader = image_loader_from_config(cfg, 8, split, endless=False, rank=0, world_size=1, augment="none")
    x = next(iter(loader))["image"][:8]
    with torch.no_grad():
        rec = model.decode(model.codes(x))
    agree, psnr = [], 0.0
    for orig, back in zip(x, rec):
        facts = analyse(orig)
        assert compare(facts, facts)["all"] and not compare(facts, analyse(torch.ones_like(orig)))["all"]
        agree.append(bool(compare(facts, analyse(back))["all"]))
        psnr += 10 * float(torch.log10(1 / (orig - back).pow(2).mean().clamp_min(1e-10)))
    return agree, psnr / len(agree)


class EchoDVAE:
    """A stand-in whose reconstruction is the image itself, except at the `blank` positions of
    each batch, which come back white (no object left): the agreement it earns is known in advance."""

    def __init__(self, *blank: int) -> None:
        self.cfg = SimpleNamespace(vocab_size=32)
        self.blank = list(blank)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        return torch.arange(x.shape[0]).view(-1, 1, 1).expand(-1, 4, 4)  # code = index in the batch

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.x.clone()
        out[[i for i in self.blank if i < len(out)]] = 1.0
        return out


def test_reconstruction_agreement_counts_images_that_keep_their_facts(full_run):
    root, _, _ = full_run
    loader = image_loader_from_config(small_config(root / "run"), 4, "val", endless=False, rank=0, world_size=1,
                                      augment="none")
    batches = list(loader)
    got = reconstruction_agreement(EchoDVAE(1, 3), batches, 8)  # 2 batches of 4, half blanked
    assert got["images"] == 8 and got["facts_agree"] == 0.5
    assert got["codebook_perplexity"] == pytest.approx(4.0) and got["dead_codes"] == 28
    assert reconstruction_agreement(EchoDVAE(), batches, 6)["facts_agree"] == 1.0
    assert reconstruction_agreement(EchoDVAE(0, 1, 2, 3), batches, 6)["facts_agree"] == 0.0


class Killed(Exception):
    pass


class KilledAfterTwoSteps(DVAETrainer):
    """Dies at the start of step 3, as a killed job would (the step-2 checkpoint is on disk)."""

    def train_step(self, batches):
        if self.step == 2:
            raise Killed
        return super().train_step(batches)


def test_resume_gives_bit_identical_losses(full_run, tmp_path):
    root, _, _ = full_run
    with pytest.raises(Killed):
        KilledAfterTwoSteps(small_config(tmp_path), check_images=0).train()
    resumed = DVAETrainer(small_config(tmp_path), check_images=0)  # checkpoint.resume=latest
    s = resumed.train()
    assert s.steps_run == 2 and s.resumed_from.endswith("step_00000002")
    want, got = losses(root / "run"), losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[i] for i in range(1, 5)] == [want[i] for i in range(1, 5)]  # bit-identical
    a = load_file(str(root / "run" / "dvae" / "dvae.safetensors"))
    b = load_file(str(tmp_path / "dvae" / "dvae.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA came back with the checkpoint


@pytest.mark.slow
def test_two_ranks_match_one_rank(full_run, tmp_path, repo_root):
    root, _, _ = full_run
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    # Reuse the data the 1-rank run built, so both read the same shard.
    shutil.copytree(root / "run" / "data", tmp_path / "data")
    args = [f"--{k}={v}" for k, v in {**SMALL, "logging.run_dir": str(tmp_path), "dvae_train.micro_batch_size": 2,
                                      "logging.tensorboard": False}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [deepspeed, "--num_gpus", "2", "--no_local_rank", "--master_port", str(29500 + os.getpid() % 1000),
           "--module", "megadalle", "train-dvae", "--preset", "tiny", "--check-images", "0", *args]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = losses(root / "run"), losses(tmp_path)
    assert sorted(two) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)


def test_noise_seed_is_stable_and_distinct():
    assert noise_seed(0, 5, "a") == noise_seed(0, 5, "a")
    assert len({noise_seed(0, 5, "a"), noise_seed(0, 6, "a"), noise_seed(0, 5, "b"), noise_seed(1, 5, "a")}) == 4
    # Pinned: the same seed in every process and Python version (a salted `hash` would differ).
    assert noise_seed(3, 7, "k") == 5187020167047321055
