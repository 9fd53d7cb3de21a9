"""One metrics interface: console (rank 0, through the progress bar), TensorBoard, optional W&B,
and a `metrics.jsonl` of every logged step (the loss history tests and tools read back).

Only rank 0 writes; other ranks get a `Metrics` whose calls do nothing, so the loop calls it
unconditionally. W&B is imported lazily and only when `logging.wandb` is on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from megadalle.config import LoggingConfig

# Keys shown on the console line (everything goes to TensorBoard / jsonl).
_CONSOLE_KEYS = ("loss", "text_loss", "image_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu")


class Metrics:
    def __init__(self, folder: Path, log_cfg: LoggingConfig, is_main: bool, run_name: str = "",
                 config: dict[str, Any] | None = None, wandb_id: str | None = None) -> None:
        self.folder = folder
        self.is_main = is_main
        self.tb = None
        self.wandb = None
        self.jsonl = None
        self.printer = print
        if not is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = folder / "metrics.jsonl"
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if log_cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tb"))
        if log_cfg.wandb:
            try:
                import wandb  # type: ignore[import-not-found]
            except ImportError:
                from megadalle.config import ConfigError

                raise ConfigError("logging.wandb=true but wandb is not installed; pip install wandb "
                                  "or set logging.wandb=false") from None
            # `id` + resume="allow": a resumed training run continues its W&B run instead of starting one.
            self.wandb = wandb.init(project=log_cfg.wandb_project, name=run_name or None, config=config,
                                    dir=str(folder), id=wandb_id, resume="allow")

    def log(self, step: int, values: dict[str, float], console: bool = True) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else str(v))
                                                          for k, v in clean.items()}}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        if console:
            shown = [f"{k} {_fmt(clean[k])}" for k in _CONSOLE_KEYS if k in clean]
            self.printer(f"step {step}: " + ", ".join(shown))

    def text(self, tag: str, text: str, step: int) -> None:
        if self.is_main and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """`image`: uint8 or float [H, W, 3]."""
        if not self.is_main:
            return
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb  # type: ignore[import-not-found]

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return str(v)
    return f"{v:.3e}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4f}"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a line cut by a crash mid-write is ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
