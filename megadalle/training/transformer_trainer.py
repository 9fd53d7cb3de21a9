"""Stage 2: the transformer on pre-encoded token shards (`megadalle train`).

Input: token shards from `megadalle encode` (`data.token_source`, else `<run_dir>/tokens/`),
streamed per rank with a resumable position; captions are tokenized on the fly with BPE dropout
(`tokenizer.bpe_dropout`) in training and without it for validation. `train.synthetic_data=true`
trains on deterministic random tokens instead (benchmarks, tests; no shards or tokenizer needed).

Loss: the paper's 1/8 text + 7/8 image cross-entropy, each averaged over its own tokens,
computed from the logits the engine's forward returns (the engine's forward must run so that
ZeRO-3 gathers parameters; `DALLETransformer.loss` computes the same numbers, see the tests).

Precision `fp16_per_resblock` (per-resblock gradient scales) and PowerSGD are installed by the
Trainer base (`distributed.engine.install_precision`, `distributed/powersgd.py`).

BPE dropout and caption dropout draw from (train.seed, update, sample key), so a resumed run
repeats the uninterrupted one bit for bit, BPE dropout included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megadalle.config import Config, TransformerConfig
from megadalle.errors import CommandError, ConfigError
from megadalle.training.sample_seeds import sample_seed, sample_uniform
from megadalle.training.striped_stream import StripedPosition
from megadalle.training.trainer import Trainer


class SyntheticTokens(StripedPosition):
    """Deterministic random (text, codes) batches; global sample i goes to rank i % world."""

    def __init__(self, tcfg: TransformerConfig, batch: int, rank: int, world: int, seed: int) -> None:
        self.t = tcfg
        self.batch, self.rank, self.world, self.seed = batch, rank, world, seed
        self.position = 0  # batches handed out by this rank

    def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, i))
        n_text = int(rng.integers(1, self.t.text_len + 1))
        text = np.zeros(self.t.text_len, dtype=np.int64)
        text[:n_text] = rng.integers(1, self.t.text_vocab_size, n_text)
        return text, rng.integers(0, self.t.image_vocab_size, self.t.image_len)

    def __iter__(self):
        while True:
            first = self.position * self.batch * self.world
            index = [first + j * self.world + self.rank for j in range(self.batch)]
            samples = [self._sample(i) for i in index]
            self.position += 1
            yield {"text": torch.from_numpy(np.stack([s[0] for s in samples])),
                   "codes": torch.from_numpy(np.stack([s[1] for s in samples])),
                   "key": [f"synthetic-{i}" for i in index]}



def dalle_loss(cfg: TransformerConfig, text: torch.Tensor, codes: torch.Tensor, text_logits: torch.Tensor,
               image_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's weighted loss from the model's logits (text (B,T,Vt), image (B,N,Vi))."""
    text_targets = text if cfg.predict_padding else text.masked_fill(text == 0, -100)
    n_text = (text_targets != -100).sum()
    text_loss = F.cross_entropy(text_logits.flatten(0, 1), text_targets.flatten(), ignore_index=-100,
                                reduction="sum") / n_text.clamp(min=1)
    image_loss = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
    w = cfg.text_loss_weight
    return {"loss": w * text_loss + (1 - w) * image_loss, "text_loss": text_loss, "image_loss": image_loss}


def drop_captions(text: torch.Tensor, keys: list[str], fraction: float, seed: int, update: int) -> torch.Tensor:
    """Replace the captions of about `fraction` of the samples by the null caption (all padding),
    so that the model also learns p(image) and sampling can use classifier-free guidance.

    Which samples lose their caption depends only on (seed, update, key): the same on any number
    of ranks and after a resume. text: (B, T) long; returns a new tensor.
    """
    if fraction <= 0:
        return text
    if len(keys) != text.shape[0]:
        raise ValueError(f"caption dropout needs one key per sample, got {len(keys)} keys for {text.shape[0]} captions")
    drop = torch.tensor([sample_uniform(seed, update, f"caption/{k}") < fraction for k in keys], device=text.device)
    return text.masked_fill(drop[:, None], 0)


def bpe_dropout_seeds(keys: list[str], seed: int, update: int) -> list[int]:
    """One BPE-dropout seed per sample from (seed, update, key): a caption's segmentation is the
    same on any number of ranks and after a resume, and changes from update to update."""
    return [sample_seed(seed, update, f"bpe/{k}") for k in keys]


def transformer_flops_per_sample(cfg: TransformerConfig) -> float:
    """Forward + backward model FLOPs of one training sample (no recomputation counted).

    Matmuls: 2 FLOPs per weight per position in the stream. Attention: QK^T and AV cost
    2 x head_dim x heads FLOPs each per (query, key) pair the layer's mask keeps, so sparse layers
    count only their allowed pairs (the masks module gives the exact count). Backward = 2 x forward.
    """
    from megadalle.transformer.masks import MaskGeometry, layer_types, mask_set

    L = cfg.seq_len
    d, hidden = cfg.dim, cfg.mlp_ratio * cfg.dim
    mlp_in = 2 * hidden if cfg.activation == "swiglu" else hidden
    per_layer_weights = d * 3 * d + d * d + d * mlp_in + hidden * d
    # Text positions go through the text head only, image positions through the image head only.
    head_flops = 2 * d * (cfg.text_len * cfg.text_vocab_size + cfg.image_len * cfg.image_vocab_size)
    g = MaskGeometry.from_config(cfg)
    attn = 0.0
    for kind in layer_types(cfg):
        kept = mask_set(g, kind, L).density()["elements"]
        attn += 2 * 2 * cfg.heads * cfg.head_dim * kept
    forward = 2 * per_layer_weights * L * cfg.depth + head_flops + attn
    return 3.0 * forward


class TransformerTrainer(Trainer):
    model_sections = ("transformer",)
    export_name = "transformer"

    def __init__(self, cfg: Config, deepspeed_config: str | dict | None = None) -> None:
        # for_stage: the transformer may have its own precision (train.precision).
        super().__init__(cfg.for_stage("train"), section="train", stage="transformer",
                         deepspeed_config=deepspeed_config)
        self.tokenizer: Any = None
        self._flops_per_sample: float | None = None

    # ---- model ----
    def build_model(self) -> nn.Module:
        from megadalle.transformer.model import DALLETransformer

        return DALLETransformer(self.cfg.transformer)

    def check_init_source(self, weights: Path) -> None:
        """Fine-tuning on captions: the run's tokenizer (and dVAE, where the run has one) must fit
        the transformer as sampling checks, and the tokenizer must be the one it learnt with."""
        if self.tcfg.synthetic_data:  # random token ids: no tokenizer, no dVAE
            return
        from megadalle.dvae.io import load_dvae_config
        from megadalle.generate.load import RunPaths, check_compatible, load_run_config
        from megadalle.training.init_weights import check_same_tokenizer

        check_same_tokenizer(weights, self.layout.tokenizer)
        tokenizer = self._load_tokenizer()
        has_dvae = (self.layout.dvae / "dvae.yaml").is_file()
        dvae_cfg = load_dvae_config(self.layout.dvae) if has_dvae else self.cfg.dvae
        paths = RunPaths(self.layout.root, weights.parent, self.layout.dvae, self.layout.tokenizer, None)
        check_compatible(load_run_config(weights.parent), dvae_cfg, tokenizer, paths,
                         fix="Fine-tune with the dVAE tokens and the tokenizer the transformer was trained with")

    # ---- data ----
    def _token_source(self, split: str) -> Path:
        return self.layout.tokens(split)

    def _load_tokenizer(self) -> Any:
        from megadalle.data.tokenizer import TextTokenizer, TokenizerFileError

        path = str(self.layout.tokenizer)
        try:
            return TextTokenizer.load_for(self.cfg.tokenizer, path)
        except TokenizerFileError as e:
            raise CommandError(f"{e} (stage 2 tokenizes captions on the fly; train one with "
                               f"`megadalle tokenizer train`, or use train.synthetic_data=true)") from None

    def build_data(self) -> Any:
        micro = self.tcfg.micro_batch_size
        if self.tcfg.synthetic_data:
            return SyntheticTokens(self.cfg.transformer, micro, self.rank, self.world, self.tcfg.seed)
        source = self._token_source("train")
        if not source.exists():
            raise CommandError(f"no token shards at {source}: run `megadalle encode` first (or set "
                               f"data.token_source, or train.synthetic_data=true)")
        from megadalle.data.loader import token_loader_from_config

        self.tokenizer = self._load_tokenizer()
        return token_loader_from_config(self.cfg, micro, "train", rank=self.rank, world_size=self.world,
                                        global_batch=self.tcfg.global_batch(self.world))

    def build_val_data(self) -> Any:
        if not self.tcfg.eval_every:
            return None
        micro = self.tcfg.micro_batch_size
        if self.tcfg.synthetic_data:
            return _Restartable(lambda: SyntheticTokens(self.cfg.transformer, micro, self.rank, self.world,
                                                        self.tcfg.seed + 10_000))
        if not self._token_source("val").exists():
            if self.tcfg.schedule.kind == "warmup_plateau":  # it would never decay: say so now
                raise ConfigError(f"train.schedule.kind=warmup_plateau needs validation tokens, and "
                                  f"{self._token_source('val')} does not exist; encode them (megadalle encode "
                                  f"--split val), or set train.schedule.kind=constant or cosine")
            return None
        from megadalle.data.loader import token_loader_from_config

        # A fresh loader per evaluation: every evaluation sees the same first `eval_batches`.
        return _Restartable(lambda: token_loader_from_config(self.cfg, micro, "val", endless=False, rank=self.rank,
                                                             world_size=self.world))

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.engine.device
        if "text" in batch:
            text = batch["text"]
        else:
            # The module's flag: DeepSpeed's engine.eval() leaves engine.training set.
            seeds = (bpe_dropout_seeds(batch["key"], self.tcfg.seed, self.updates)
                     if self.engine.module.training else None)
            text = self.tokenizer.encode(batch["caption"], dropout_seeds=seeds)
        return text.to(device), batch["codes"].to(device)

    def compute_loss(self, model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        text, codes = self._inputs(batch)
        if self.cfg.transformer.caption_drop > 0 and self.engine.module.training:
            text = drop_captions(text, batch["key"], self.cfg.transformer.caption_drop, self.tcfg.seed, self.updates)
        text_logits, image_logits = model(text, codes)
        out = dalle_loss(self.cfg.transformer, text, codes, text_logits, image_logits)
        return out["loss"], {"text_loss": out["text_loss"].detach(), "image_loss": out["image_loss"].detach()}

    def _sample_captions(self) -> list[str]:
        """Up to 8 captions of the first validation (else training) shard batch, fixed for the run."""
        if getattr(self, "_captions", None) is None:
            from megadalle.data.loader import token_loader_from_config

            split = "val" if self._token_source("val").exists() else "train"
            loader = token_loader_from_config(self.cfg, 8, split, endless=False, rank=0, world_size=1)
            self._captions = next(iter(loader), {"caption": []})["caption"][:8]
        return self._captions

    def write_samples(self, step: int) -> list[Path]:
        """A grid of images sampled from the EMA weights for fixed captions, decoded by the run's
        dVAE (`<run_dir>/dvae`): `samples/step_XXXXXXXX.png` and TensorBoard. Skipped (with one
        message) without a dVAE or without captions (synthetic data)."""
        model = self.ema_model()  # every rank: gathering is collective when EMA is off
        if not self.is_main:
            return []
        dvae_dir = self.layout.dvae
        if self.tcfg.synthetic_data or not (dvae_dir / "dvae.safetensors").is_file():
            if not getattr(self, "_warned_samples", False):
                self.metrics.printer(f"sample grids skipped: they need captions and a dVAE at {dvae_dir}")
                self._warned_samples = True
            return []
        from megadalle.dvae.io import load_dvae
        from megadalle.data.images import make_grid, save_png
        from megadalle.transformer.sampling import generate

        captions = self._sample_captions()
        if not captions:
            return []
        dvae = load_dvae(dvae_dir)
        text = self.tokenizer.encode(captions)
        # Own generator: sampling must not shift the training RNG streams.
        gen = torch.Generator().manual_seed(self.cfg.sampling.seed)
        with torch.no_grad():
            codes = generate(model, text, temperature=self.cfg.sampling.temperature, generator=gen)
            g = self.cfg.transformer.image_grid
            images = dvae.decode(codes.view(-1, g, g))  # (B, 3, H, W) in [0, 1]
        grid = make_grid(images.float().cpu(), ncol=4)
        path = save_png(grid, self.folder / "samples" / f"step_{step:08d}.png")
        self.metrics.image("samples", (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8"), step)
        self.metrics.text("sample_captions", "\n".join(f"{i}: {c}" for i, c in enumerate(captions)), step)
        return [path]

    def tokens_in_batch(self, batch: dict[str, Any]) -> int:
        return int(batch["codes"].shape[0]) * self.cfg.transformer.seq_len

    def train_flops(self, batch: dict[str, Any]) -> float | None:
        if self._flops_per_sample is None:
            self._flops_per_sample = transformer_flops_per_sample(self.cfg.transformer)
        return self._flops_per_sample * int(batch["codes"].shape[0])


class _Restartable:
    """An iterable that starts a fresh stream at every iteration (validation)."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __iter__(self):
        return iter(self.make())
