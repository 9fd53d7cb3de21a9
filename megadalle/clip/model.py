"""A small CLIP-style reranker: a conv image encoder and a transformer text encoder over BPE ids.

Both towers end in an L2-normalised embedding of `embed_dim`; their dot product times a
learned temperature gives the logits of the InfoNCE loss (`loss.py`). The model is tiny on
purpose: it reranks samples of the built-in shapes data on a CPU, where what matters is shape,
colour and *position*. That is why the image tower keeps a coarse spatial map (flattened 4x4
grid) instead of global average pooling, which would throw position away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from megadalle.errors import CommandError
from megadalle.config import ClipConfig

# Final spatial grid of the image tower before flattening (position survives as feature index).
_POOL_GRID = 4


@dataclass(frozen=True)
class ClipGeometry:
    """What the reranker needs to know about the data besides its own ClipConfig."""

    text_vocab_size: int
    text_len: int
    image_size: int


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig, image_size: int) -> None:
        super().__init__()
        c = cfg.image_channels
        # A 4x4 patchify stem: reranking needs colour, coarse shape and position, not fine
        # texture, and full-resolution convolutions would cost ~50x more on a CPU.
        stem = 4 if image_size >= 8 * _POOL_GRID else 1
        layers: list[nn.Module] = [nn.Conv2d(3, c, stem, stride=stem), nn.GELU(),
                                   nn.Conv2d(c, c, 3, padding=1), nn.GELU()]
        width, size = c, image_size // stem
        # Halve the resolution until the map is _POOL_GRID wide; widths double up to 4c.
        while size > _POOL_GRID:
            out = min(width * 2, 4 * c)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GELU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GELU()]
            width, size = out, (size + 1) // 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(_POOL_GRID)
        self.head = nn.Sequential(nn.Linear(width * _POOL_GRID * _POOL_GRID, cfg.dim), nn.GELU(),
                                  nn.Linear(cfg.dim, cfg.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images [B,3,H,W] in [0,1], centred so the first conv sees zero-mean inputs.
        x = images.to(self.head[0].weight.dtype) * 2 - 1  # bf16/fp16 engines keep 16-bit weights
        x = self.pool(self.features(x))  # (B, width, 4, 4)
        return self.head(x.flatten(1))  # (B, embed_dim)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig, vocab_size: int, text_len: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(text_len, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, 4 * cfg.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.text_depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.embed_dim)
        self.text_len = text_len

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[1] != self.text_len:
            raise ValueError(f"text must be long [B, {self.text_len}], got {tuple(text.shape)}")
        # 0 is the tokenizer's padding id (docs/DESIGN.md). An all-padding row (empty caption)
        # keeps its first slot so attention and the mean below stay finite.
        valid = text != 0
        valid[:, 0] |= ~valid.any(dim=1)
        # Captions are much shorter than text_len; the all-padding tail is masked anyway, so
        # dropping it changes nothing but the cost (about 3x less on the shapes captions).
        used = int(valid.any(0).nonzero().max()) + 1
        text, valid = text[:, :used], valid[:, :used]
        x = self.embed(text) + self.pos[:used]  # (B, used, dim)
        x = self.blocks(x, src_key_padding_mask=~valid)
        x = self.norm(x)
        w = valid.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(1) / w.sum(1)  # mean over the caption's own tokens: (B, dim)
        return self.proj(pooled)


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig, geometry: ClipGeometry) -> None:
        super().__init__()
        self.cfg, self.geometry = cfg, geometry
        self.image = ImageEncoder(cfg, geometry.image_size)
        self.text = TextEncoder(cfg, geometry.text_vocab_size, geometry.text_len)
        # CLIP's initial temperature 0.07, learned in log space and capped at 100 (see loss).
        # Shape [1], not a 0-d tensor: DeepSpeed's parameter broadcast cannot view 0-d tensors.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> unit vectors [B, embed_dim]."""
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text long [B, text_len] (0 = padding) -> unit vectors [B, embed_dim]."""
        return F.normalize(self.text(text), dim=-1)

    def embed(self, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(text)

    def similarity(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image with its own caption: [B]."""
        img, txt = self.embed(images, text)
        return (img * txt).sum(-1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training loss on matched pairs. It is `forward` so that a DeepSpeed engine's call
        (which gathers ZeRO-3 partitions) covers the temperature parameter too."""
        from megadalle.clip.loss import contrastive_loss

        img, txt = self.embed(images, text)
        # Identical token rows are the same caption: both are correct matches, not negatives.
        same = (text.unsqueeze(1) == text.unsqueeze(0)).all(-1)  # (B, B)
        return contrastive_loss(img, txt, self.logit_scale, positives=same)

    loss = forward


# ---- export: clip.safetensors + clip.yaml (like the dVAE's weights export) ----

WEIGHTS_FILE = "clip.safetensors"
CONFIG_FILE = "clip.yaml"


def save_clip(model: ClipModel, out_dir: str | Path) -> Path:
    import yaml
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Write to temporary names and rename, so a crash never leaves a half-written export that a
    # later run would mistake for a finished one.
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file(state, str(tmp_w))
    tmp_c.write_text(yaml.safe_dump({"clip": asdict(model.cfg), "geometry": asdict(model.geometry)}, sort_keys=False))
    tmp_w.replace(out / WEIGHTS_FILE)
    tmp_c.replace(out / CONFIG_FILE)
    return out


def load_clip(model_dir: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """Rebuild a reranker written by `save_clip` (or `megadalle train-clip`)."""
    import yaml
    from safetensors.torch import load_file

    d = Path(model_dir)
    wpath, cpath = d / WEIGHTS_FILE, d / CONFIG_FILE
    for p in (cpath, wpath):
        if not p.is_file():
            raise CommandError(f"reranker file {p} is missing; train one with `megadalle train-clip` "
                                    f"or point to a folder holding {WEIGHTS_FILE} and {CONFIG_FILE}")
    try:
        meta = yaml.safe_load(cpath.read_text())
        cfg = ClipConfig(**meta["clip"])
        geometry = ClipGeometry(**meta["geometry"])
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise CommandError(f"{cpath} is not a reranker config written by megadalle: {e}") from None
    model = ClipModel(cfg, geometry)
    try:
        model.load_state_dict(load_file(str(wpath)))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CommandError(f"{wpath} does not match the reranker described by {cpath}: {e}") from None
    return model.to(device).eval()
