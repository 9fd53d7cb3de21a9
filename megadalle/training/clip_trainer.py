"""`megadalle train-clip`: the contrastive reranker, trained with the shared Trainer on the same
image shards as the dVAE (captions through the run's BPE tokenizer).

Writes `<run_dir>/clip/`: checkpoints/, metrics, and the export `clip.safetensors` + `clip.yaml`
that `load_clip` (and so `megadalle sample` / `eval`) reads.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megadalle.clip.model import ClipGeometry, ClipModel
from megadalle.config import Config
from megadalle.generate.load import load_tokenizer
from megadalle.training.trainer import Trainer


class ClipTrainer(Trainer):
    model_sections = ("clip",)
    export_name = "clip"

    def __init__(self, cfg: Config, **kwargs: Any) -> None:
        # for_stage: the reranker may have its own precision (clip_train.precision).
        super().__init__(cfg.for_stage("clip_train"), section="clip_train", stage="clip", **kwargs)
        self.tokenizer = load_tokenizer(cfg)
        self.geometry = ClipGeometry(cfg.tokenizer.vocab_size, cfg.tokenizer.text_len, cfg.data.image_size)

    def build_model(self) -> ClipModel:
        return ClipModel(self.cfg.clip, self.geometry)

    def build_data(self):
        from megadalle.data.loader import image_loader_from_config

        return image_loader_from_config(self.cfg, self.tcfg.micro_batch_size, "train", rank=self.rank,
                                        world_size=self.world, augment=self.cfg.clip.augment,
                                        global_batch=self.tcfg.global_batch(self.world))

    def build_val_data(self):
        from megadalle.data.loader import image_loader_from_config
        from megadalle.data.shards import ShardError

        try:
            return image_loader_from_config(self.cfg, self.tcfg.micro_batch_size, "val", endless=False,
                                            rank=self.rank, world_size=self.world, augment="none")
        except ShardError:
            return None  # no validation split configured: train without evaluation

    def compute_loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        text = self.tokenizer.encode(batch["caption"])  # (B, text_len), 0 = padding
        device = batch["image"].device if not hasattr(model, "device") else model.device
        out = model(batch["image"].to(device), text.to(device))
        return out["loss"], {"accuracy": out["accuracy"], "temperature": out["temperature"]}

    def export_config(self) -> dict[str, Any]:
        # The format `load_clip` reads: the reranker's own config and the data geometry.
        return {"clip": asdict(self.cfg.clip), "geometry": asdict(self.geometry)}

    def export_settings(self, exported: dict[str, Any]) -> dict[str, Any]:
        # The geometry comes from the tokenizer and data settings (see __init__).
        names = {"text_vocab_size": "tokenizer.vocab_size", "text_len": "tokenizer.text_len",
                 "image_size": "data.image_size"}
        clip, geometry = exported.get("clip"), exported.get("geometry")
        return {**({f"clip.{k}": v for k, v in clip.items()} if isinstance(clip, dict) else {}),
                **({names[k]: v for k, v in geometry.items() if k in names} if isinstance(geometry, dict) else {})}

    def check_init_source(self, weights: Path) -> None:
        from megadalle.training.init_weights import check_same_tokenizer

        check_same_tokenizer(weights, self.layout.tokenizer)
