"""The paper's stage-1 schedules, all cosine, with lengths as fractions of the run.

KL weight beta 0 -> 6.6 over the first 5k of 3M updates, temperature 1 -> 1/16 over the first
150k, learning rate 1e-4 -> 1.25e-6 over the first 1.2M; each holds its end value afterwards.
Expressing the lengths as fractions keeps the shape when a run is shorter (the tiny preset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megadalle.config import DVAEConfig, TrainConfig


def cosine(step: int, length: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at step `length`, then constant."""
    if length <= 0 or step >= length:
        return end
    t = max(step, 0) / length
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def fraction_steps(fraction: float, total_steps: int) -> int:
    return max(1, round(fraction * total_steps)) if fraction > 0 else 0


@dataclass(frozen=True)
class DVAESchedules:
    """beta(step), tau(step), lr(step) for a run of `total_steps` updates."""

    total_steps: int
    kl_weight: float
    kl_steps: int
    tau_start: float
    tau_end: float
    tau_steps: int
    lr_start: float
    lr_end: float
    lr_steps: int
    lr_warmup: int

    @classmethod
    def from_config(cls, dvae: DVAEConfig, train: TrainConfig) -> "DVAESchedules":
        n = train.steps
        sched = train.schedule
        lr_end = sched.min_lr if sched.kind == "cosine" else train.optimizer.lr
        return cls(
            total_steps=n, kl_weight=dvae.kl_weight,
            kl_steps=fraction_steps(dvae.kl_warmup_fraction, n),
            tau_start=dvae.temperature_start, tau_end=dvae.temperature_end,
            tau_steps=fraction_steps(dvae.temperature_anneal_fraction, n),
            lr_start=train.optimizer.lr, lr_end=lr_end,
            lr_steps=fraction_steps(dvae.lr_anneal_fraction, n), lr_warmup=sched.warmup_steps,
        )

    def beta(self, step: int) -> float:
        return cosine(step, self.kl_steps, 0.0, self.kl_weight)

    def tau(self, step: int) -> float:
        return cosine(step, self.tau_steps, self.tau_start, self.tau_end)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr (for a LambdaLR): optional linear warm-up, then cosine."""
        if step < self.lr_warmup:
            return (step + 1) / self.lr_warmup
        lr = cosine(step - self.lr_warmup, self.lr_steps, self.lr_start, self.lr_end)
        return lr / self.lr_start

    def lr(self, step: int) -> float:
        return self.lr_start * self.lr_factor(step)
