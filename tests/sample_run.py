"""A run folder with randomly initialised models, laid out as the trainers write it.

Sampling tests need the files (tokenizer.json, dvae/, transformer/ export, clip/) but not
trained weights: plumbing, determinism and error handling do not depend on quality.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from megadalle.clip.model import ClipGeometry, ClipModel, save_clip
from megadalle.config import Config, load_config

SMALL = {
    "data.image_size": 32, "dvae.image_size": 32, "dvae.group_count": 4, "dvae.n_hid": 16, "dvae.n_init": 16, "dvae.vocab_size": 64,
    "tokenizer.vocab_size": 300, "tokenizer.text_len": 24,
    "transformer.dim": 32, "transformer.depth": 2, "transformer.heads": 2, "transformer.head_dim": 16,
    "transformer.text_vocab_size": 300, "transformer.text_len": 24, "transformer.image_vocab_size": 64,
    "transformer.image_grid": 4, "transformer.conv_kernel": 3,
    "clip.dim": 32, "clip.embed_dim": 16, "clip.text_depth": 1, "clip.heads": 2, "clip.image_channels": 8,
    "sampling.n": 4, "sampling.top": 2, "sampling.batch_size": 4,
}


def small_config(run_dir: Path, **more) -> Config:
    return load_config("tiny", overrides={**SMALL, "logging.run_dir": str(run_dir), **more})


def write_transformer_export(model: torch.nn.Module, cfg: Config, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()},
              str(folder / "transformer.safetensors"))
    (folder / "transformer.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def build_random_run(run_dir: Path, **more) -> Config:
    from megadalle.data.shapes import ShapesDataset
    from megadalle.data.tokenizer import TextTokenizer
    from megadalle.dvae.io import save_dvae
    from megadalle.dvae.model import DiscreteVAE
    from megadalle.transformer.model import DALLETransformer

    cfg = small_config(run_dir, **more)
    torch.manual_seed(0)
    ds = ShapesDataset("train")
    tok = TextTokenizer.from_config([ds.sample(i).caption for i in range(300)], cfg.tokenizer)
    tok.save(run_dir / "tokenizer.json")
    save_dvae(DiscreteVAE(cfg.dvae), cfg.dvae, run_dir / "dvae")
    write_transformer_export(DALLETransformer(cfg.transformer), cfg, run_dir / "transformer")
    geo = ClipGeometry(cfg.tokenizer.vocab_size, cfg.tokenizer.text_len, cfg.data.image_size)
    save_clip(ClipModel(cfg.clip, geo), run_dir / "clip")
    return cfg
