"""The position of a striped stream, kept so that another number of ranks can continue it.

A striped stream hands global sample i to rank i % world, `batch` samples per rank per call, so
call k of every rank together covers samples [k B w, (k+1) B w). Its position is kept as the
number of global samples consumed: a run resumed at another number of ranks continues from the
same sample, and the samples of every optimizer step are the same set whenever micro-batch x
accumulation x ranks is (training/elastic.py).
"""

from __future__ import annotations

from typing import Any

from megadalle.config import ConfigError


class StripedPosition:
    """Mixin: `position` (calls made by this rank), `batch`, `world` come from the stream."""

    elastic = True  # its state is the same on every rank and loads at any number of ranks
    position: int
    batch: int
    world: int

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.position * self.batch * self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "position" in state:  # written before positions were global: only the same ranks resume it
            self.position = int(state["position"])
            return
        samples, per_call = int(state["samples"]), self.batch * self.world
        if samples % per_call:
            raise ConfigError(f"the data position ({samples} samples consumed) is not a whole number of this run's "
                              f"calls ({self.batch} samples x {self.world} ranks); keep the global batch of the "
                              f"saved run (micro-batch x accumulation x ranks)")
        self.position = samples // per_call
