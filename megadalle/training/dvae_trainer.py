"""Stage 1 trainer (`megadalle train-dvae`): the dVAE on the shared DeepSpeed Trainer base.

What this subclass adds to the base loop:
- the paper's schedules: KL weight beta and Gumbel temperature tau (cosine, lengths as fractions
  of `dvae_train.steps`) and the lr (cosine over `dvae.lr_anneal_fraction` of the run);
- Gumbel noise drawn per sample from a seed of (run seed, update, sample key), so that a step's
  loss does not depend on how the global batch is split over ranks, nor on RNG state at resume;
- metrics: rec / kl terms, beta, tau, PSNR per step; codebook perplexity and dead codes over each
  logging window (counted on every rank, summed);
- a PNG grid of originals (top row) over EMA reconstructions (bottom row) every `sample_every`;
- the export: EMA weights as `<run_dir>/dvae/dvae.safetensors` + `dvae.yaml` (`load_dvae`);
- at the end, on the shapes data, the share of held-out images whose reconstruction the shapes
  analyser reads as the same facts as the original.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megadalle.config import Config
from megadalle.distributed import engine as dist
from megadalle.dvae import loss as L
from megadalle.dvae.model import DiscreteVAE
from megadalle.dvae.schedules import DVAESchedules
from megadalle.training.sample_seeds import sample_seed as noise_seed
from megadalle.training.schedules import LRSchedule
from megadalle.training.trainer import Trainer


class PaperLRSchedule(LRSchedule):
    """The base schedule's interface with the paper's stage-1 lr: cosine to `min_lr` over the
    first `dvae.lr_anneal_fraction` of the run, then constant."""

    def __init__(self, base: LRSchedule, schedules: DVAESchedules) -> None:
        super().__init__(base.cfg, base.peak, base.total)
        self.schedules = schedules

    def lr(self, update: int) -> float:
        return self.schedules.lr(update)


class DVAETrainer(Trainer):
    model_sections = ("dvae",)
    export_name = "dvae"

    def __init__(self, cfg: Config, deepspeed_config: str | dict | None = None, gradient_hook: Any = None,
                 check_images: int = 200) -> None:
        # for_stage: the dVAE may have its own precision (dvae_train.precision).
        super().__init__(cfg.for_stage("dvae_train"), section="dvae_train", stage="dvae",
                         deepspeed_config=deepspeed_config, gradient_hook=gradient_hook)
        self.schedules = DVAESchedules.from_config(cfg.dvae, cfg.dvae_train)
        self.check_images = check_images
        self._usage = torch.zeros(cfg.dvae.vocab_size, dtype=torch.long)  # codes seen this log window
        self._sample_images: torch.Tensor | None = None

    # ---------------------------------------------------------------- hooks of the base
    def build_model(self) -> DiscreteVAE:
        return DiscreteVAE(self.cfg.dvae)

    def build_data(self) -> Any:
        from megadalle.data.loader import image_loader_from_config

        return image_loader_from_config(self.cfg, self.tcfg.micro_batch_size, "train", rank=self.rank,
                                        world_size=self.world, global_batch=self.tcfg.global_batch(self.world))

    def build_val_data(self) -> Any:
        if not self.tcfg.eval_every:
            return None
        from megadalle.data.loader import image_loader_from_config

        return image_loader_from_config(self.cfg, self.tcfg.micro_batch_size, "val", endless=False,
                                        rank=self.rank, world_size=self.world)

    def setup(self) -> None:
        if self._set_up:
            return
        super().setup()
        # Stateless, so replacing it after a resume loses nothing.
        self.schedule = PaperLRSchedule(self.schedule, self.schedules)

    def compute_loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        device = dist.device_of(model)
        x = batch["image"].to(device, non_blocking=True)
        g = self.cfg.dvae.grid_size
        seeds = [noise_seed(self.tcfg.seed, self.updates, k) for k in batch["key"]]
        noise = L.per_sample_gumbel((self.cfg.dvae.vocab_size, g, g), seeds, device=device)
        tau, beta = self.schedules.tau(self.updates), self.schedules.beta(self.updates)
        out = model(x, tau, beta, noise)
        # DeepSpeed's engine.eval() leaves the engine's own flag set; the module's is reliable.
        if getattr(model, "module", model).training:
            self._usage += L.code_counts(out["codes"], self.cfg.dvae.vocab_size).cpu()
        metrics = {"rec": out["rec"].detach(), "kl": out["kl"].detach(), "beta": beta, "tau": tau,
                   "psnr": L.psnr(out["recon"], x)}
        return out["loss"], metrics

    def train_step(self, batches: Any) -> dict[str, float]:
        metrics = super().train_step(batches)
        step = self.step + 1  # the base counts the step after this returns
        if step % self.tcfg.log_every == 0 or step == self.tcfg.steps:
            self._log_codebook(step)
        return metrics

    def _log_codebook(self, step: int) -> None:
        counts = sum(dist.all_gather_object(self._usage))
        self._usage.zero_()
        self.metrics.log(step, {"codebook_perplexity": L.perplexity(counts),
                                "dead_codes": float((counts == 0).sum())}, console=False)

    def export_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg.dvae)

    def export_settings(self, exported: dict[str, Any]) -> dict[str, Any]:
        return {f"dvae.{k}": v for k, v in exported.items()}  # dvae.yaml is the DVAEConfig alone

    # ---------------------------------------------------------------- samples
    def _fixed_images(self) -> torch.Tensor:
        if self._sample_images is None:
            from megadalle.data.loader import image_loader_from_config

            split = "val" if self.cfg.data.source == "shapes" or self.cfg.data.val_source else "train"
            loader = image_loader_from_config(self.cfg, 8, split, endless=False, rank=0, world_size=1,
                                              augment="none")
            self._sample_images = next(iter(loader))["image"]
        return self._sample_images

    @torch.no_grad()
    def write_samples(self, step: int) -> list[Path]:
        # Gathering the weights (no EMA, or a sharded one) is collective; else only rank 0 has them.
        if not self.ema_model_is_collective and not self.is_main:
            return []
        model = self.ema_model()
        if not self.is_main:
            return []
        from megadalle.data.images import make_grid, save_png

        x = self._fixed_images()
        rec = model.reconstruct(x)
        grid = make_grid(torch.cat([x, rec]), ncol=x.shape[0])  # originals above reconstructions
        path = save_png(grid, self.folder / "samples" / f"recon_{step:08d}.png")
        self.metrics.image("reconstructions", grid.permute(1, 2, 0).numpy(), step)
        return [path]

    # ---------------------------------------------------------------- quality check
    @torch.no_grad()
    def reconstruction_check(self) -> dict[str, float]:
        """On the shapes data: share of unseen images whose reconstruction (EMA weights) the
        analyser reads as the same facts as the original, plus perplexity and PSNR.

        Two figures: `facts_agree` on the val split (new images of the (shape, colour) pairs seen
        in training) and `facts_agree_heldout` on the heldout split (pairs the dVAE never saw, so
        it must also generalise across combinations; the stricter test)."""
        if self.check_images <= 0 or self.cfg.data.source != "shapes":
            return {}
        if not self.ema_model_is_collective and not self.is_main:
            return {}
        model = self.ema_model()
        if not self.is_main:
            return {}
        from megadalle.data.loader import image_loader_from_config

        sc = self.cfg.data.shapes
        out: dict[str, float] = {}
        for split, suffix in (("val", ""), ("heldout", "_heldout")):
            if getattr(sc, f"n_{split}") == 0 or (split == "heldout" and sc.heldout_fraction == 0):
                continue
            loader = image_loader_from_config(self.cfg, 64, split, endless=False, rank=0, world_size=1,
                                              augment="none")
            got = reconstruction_agreement(model, loader, self.check_images)
            out.update({f"{k}{suffix}": v for k, v in got.items()})
        return out

    def train(self):  # type: ignore[override]
        summary = super().train()
        check = self.reconstruction_check()
        if check:
            self.metrics.log(self.step, check, console=False)
            parts = []
            if "facts_agree" in check:
                parts.append(f"{check['facts_agree']:.1%} of {int(check['images'])} unseen images keep their facts "
                             f"(codebook perplexity {check['codebook_perplexity']:.1f} of "
                             f"{self.cfg.dvae.vocab_size}, PSNR {check['psnr']:.1f} dB)")
            if "facts_agree_heldout" in check:
                parts.append(f"{check['facts_agree_heldout']:.1%} of {int(check['images_heldout'])} with held-out "
                             f"(shape, colour) pairs (PSNR {check['psnr_heldout']:.1f} dB)")
            summary.written["reconstruction check"] = "; ".join(parts)
        self.check = check
        return summary


@torch.no_grad()
def reconstruction_agreement(model: DiscreteVAE, batches: Any, limit: int) -> dict[str, float]:
    from megadalle.data.shapes import analyse, compare

    agree, n, psnr_sum = 0, 0, 0.0
    counts = torch.zeros(model.cfg.vocab_size, dtype=torch.long)
    for batch in batches:
        if batch is None:
            continue
        x = batch["image"][: limit - n]
        codes = model.codes(x)
        rec = model.decode(codes)
        counts += L.code_counts(codes, model.cfg.vocab_size)
        psnr_sum += float(L.psnr(rec, x)) * x.shape[0]
        for i in range(x.shape[0]):
            agree += bool(compare(analyse(x[i]), analyse(rec[i]))["all"])
        n += x.shape[0]
        if n >= limit:
            break
    if n == 0:
        return {}
    return {"facts_agree": agree / n, "images": float(n), "codebook_perplexity": L.perplexity(counts),
            "dead_codes": float((counts == 0).sum()), "psnr": psnr_sum / n}
