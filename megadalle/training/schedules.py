"""Learning-rate schedules with checkpointable state.

- `warmup_plateau` (the paper's stage 2): linear warm-up to the peak over `warmup_steps` updates,
  then the lr is multiplied by `plateau_factor` (0.5) each time the validation loss stops improving
  for `plateau_patience` evaluations, at most `max_decays` (5) times.
- `cosine` (stage 1): warm-up, then cosine from the peak to `min_lr` over the rest of the run.
- `constant`: warm-up, then the peak.

The schedule is indexed by *applied* updates (skipped steps do not advance it), and the plateau
logic sees only what `observe(val_loss)` is given, so its state is a few numbers saved with every
checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from megadalle.config import ScheduleConfig


class LRSchedule:
    def __init__(self, sched: ScheduleConfig, peak_lr: float, total_updates: int) -> None:
        self.cfg = sched
        self.peak = peak_lr
        self.total = max(1, total_updates)
        self.decays = 0
        self.best = math.inf
        self.bad_evals = 0

    def lr(self, update: int) -> float:
        """The lr for update number `update` (0-based)."""
        c = self.cfg
        if c.warmup_steps and update < c.warmup_steps:
            return self.peak * (update + 1) / c.warmup_steps
        if c.kind == "cosine":
            # The last update (total - 1) runs at exactly min_lr.
            span = max(1, self.total - 1 - c.warmup_steps)
            t = min(1.0, (update - c.warmup_steps) / span)
            return c.min_lr + (self.peak - c.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        if c.kind == "warmup_plateau":
            return max(c.min_lr, self.peak * c.plateau_factor ** self.decays)
        return self.peak

    def observe(self, val_loss: float) -> bool:
        """Feed one validation loss; True when this evaluation decayed the lr."""
        if self.cfg.kind != "warmup_plateau" or not math.isfinite(val_loss):
            return False
        if val_loss < self.best * (1 - self.cfg.plateau_threshold):
            self.best = val_loss
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.plateau_patience and self.decays < self.cfg.max_decays:
            self.decays += 1
            self.bad_evals = 0
            # The plateau is judged afresh at the new lr.
            self.best = val_loss
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.cfg.kind, "decays": self.decays, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decays = int(state["decays"])
        self.best = float(state["best"])
        self.bad_evals = int(state["bad_evals"])
