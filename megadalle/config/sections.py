"""The typed sections of the configuration, and `Config`, which holds one of each.

Each section validates itself in `__post_init__` with a message that says what to change;
cross-section rules live in `Config.__post_init__`. Defaults are the paper's (Ramesh et al.
2021); each field says where its number comes from where that is not obvious.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megadalle.config.coerce import build_dataclass, read_yaml, set_dotted
from megadalle.errors import ConfigError

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ShapesConfig:
    """The built-in synthetic data set (procedurally rendered shapes with captions)."""

    image_size: int = 0  # 0: data.image_size (rendered at the size the models read)
    n_train: int = 20000
    n_val: int = 1000
    n_heldout: int = 1000
    max_objects: int = 2
    # Fraction of scenes with two objects (and a relation) when max_objects is 2.
    two_object_fraction: float = 0.3
    # Fraction of (shape, colour) combinations never shown in training: the compositional
    # held-out set. Chosen deterministically from `seed`.
    heldout_fraction: float = 0.15
    seed: int = 0
    samples_per_shard: int = 1000

    def __post_init__(self) -> None:
        _check(self.image_size == 0 or self.image_size >= 16,
               f"data.shapes.image_size={self.image_size}: use at least 16 pixels (or 0 for data.image_size)")
        _check(self.max_objects in (1, 2), f"data.shapes.max_objects={self.max_objects}: must be 1 or 2")
        _check(0.0 <= self.two_object_fraction <= 1.0, "data.shapes.two_object_fraction must be in [0, 1]")
        _check(0.0 <= self.heldout_fraction < 1.0, "data.shapes.heldout_fraction must be in [0, 1)")
        _check(self.n_train > 0 and self.n_val >= 0 and self.n_heldout >= 0,
               "data.shapes.n_train must be > 0, n_val and n_heldout >= 0")
        _check(self.samples_per_shard >= 1, "data.shapes.samples_per_shard must be >= 1")


@dataclass
class DataConfig:
    # "shapes" (built in, generated on demand), or a directory / glob of tar shards, or an
    # image folder with side-by-side .txt captions.
    source: str = "shapes"
    # Token shards written by `megadalle encode` (stage 2 input). Empty: derived from run_dir.
    token_source: str = ""
    val_source: str = ""
    image_size: int = 256
    shuffle_buffer: int = 1000
    num_workers: int = 0
    seed: int = 0
    # Augmentation recipe: "stage1" (random crop, resize, flip), "stage2" (centre-ish crop, no
    # flip; images may contain text), or "none" (resize only; deterministic).
    augment: str = "stage1"
    min_image_side: int = 16
    max_aspect_ratio: float = 4.0
    # Images whose header declares more pixels are skipped (`too_large`) before decoding, which
    # bounds a sample's memory at about 4 bytes per allowed pixel (a 560 KB PNG can declare
    # 12000 x 12000 and take gigabytes to decode). 64M allows 8000 x 8000.
    max_image_pixels: int = 64_000_000
    # Sample order of training streams. "global": one sequence per epoch whatever the number of
    # ranks; the saved position resumes at another number of ranks, workers or micro-batch split
    # with the same global batch (data/global_order.py; every rank walks every shard's headers,
    # which costs 0-58% of the data pipeline's throughput, see that module). "slots": each rank
    # and worker reads its own shards (less I/O), and only the same layout can resume it.
    order: str = "global"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)

    def __post_init__(self) -> None:
        _check(self.order in ("global", "slots"), f"data.order={self.order!r}: choose global or slots")
        _check(self.augment in ("stage1", "stage2", "none"),
               f"data.augment={self.augment!r}: choose one of stage1, stage2, none")
        _check(self.image_size >= 8, f"data.image_size={self.image_size}: use at least 8")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer must be >= 0 (0 disables shuffling)")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.max_aspect_ratio >= 1.0, "data.max_aspect_ratio must be >= 1")
        _check(self.max_image_pixels >= self.min_image_side ** 2,
               f"data.max_image_pixels={self.max_image_pixels}: must allow at least data.min_image_side^2 pixels")


@dataclass
class TokenizerConfig:
    path: str = ""  # tokenizer.json; empty: <run_dir>/tokenizer.json
    vocab_size: int = 16384
    text_len: int = 256
    bpe_dropout: float = 0.1  # applied in training only
    lowercase: bool = True
    min_frequency: int = 2

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 260,
               f"tokenizer.vocab_size={self.vocab_size}: byte-level BPE needs at least 260 (256 bytes + specials)")
        _check(self.text_len >= 1, "tokenizer.text_len must be >= 1")
        _check(0.0 <= self.bpe_dropout < 1.0, "tokenizer.bpe_dropout must be in [0, 1)")


@dataclass
class DVAEConfig:
    image_size: int = 256
    channels: int = 3
    n_hid: int = 256
    n_init: int = 128  # decoder's first width (the codebook dimension)
    group_count: int = 4
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    logit_laplace_eps: float = 0.1
    kl_weight: float = 6.6
    # Schedule lengths as fractions of the run, so they scale with train length. The paper's
    # 5,000 / 150,000 / 1,200,000 updates of a 3,000,000-update run give these fractions.
    kl_warmup_fraction: float = 5000 / 3_000_000
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_anneal_fraction: float = 150_000 / 3_000_000
    # Cosine lr 1e-4 -> dvae_train.schedule.min_lr over the first 1.2M of 3M updates.
    lr_anneal_fraction: float = 1_200_000 / 3_000_000
    straight_through: bool = False
    # Not in the paper and not implemented: kept so that configs and checkpoints that carry the key
    # (always false) still load; true is refused rather than silently ignored.
    dead_code_restart: bool = False
    # Reconstruction term: "logit_laplace" (the paper's) or "gaussian" (fixed-sigma Gaussian on the
    # mapped pixels, the classic VAE choice). Why a second one: at a few CPU minutes the
    # logit-Laplace decoder learns to raise its scale b on object pixels instead of their colour
    # (a larger b shrinks the gradient on the mean), and the codes never learn colour (README, "dVAE").
    reconstruction_loss: str = "logit_laplace"
    gaussian_sigma: float = 0.1  # in mapped-pixel units; the Gaussian term is (y - mean)^2 / (2 sigma^2) + const
    # Start the decoder's output at this pixel value (the data's dominant colour) instead of OpenAI's
    # zero bias (grey); negative = zero bias. On a uniform background it avoids an early collapse
    # where every position pushes the same code towards the background colour (measured; README).
    init_pixel_value: float = -1.0

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (self.group_count - 1)

    def __post_init__(self) -> None:
        _check(self.group_count >= 1, "dvae.group_count must be >= 1")
        down = 2 ** (self.group_count - 1)
        _check(self.image_size % down == 0,
               f"dvae.image_size={self.image_size} must be divisible by 2^(group_count-1)={down}")
        _check(self.vocab_size >= 2, "dvae.vocab_size must be >= 2")
        _check(0 < self.logit_laplace_eps < 0.5, "dvae.logit_laplace_eps must be in (0, 0.5)")
        _check(0 < self.temperature_end <= self.temperature_start,
               "dvae.temperature_end must be > 0 and <= temperature_start")
        _check(self.n_hid % 4 == 0, f"dvae.n_hid={self.n_hid}: must be divisible by 4 (bottleneck width = n_hid/4)")
        _check(self.n_init >= 1 and self.n_blk_per_group >= 1 and self.channels >= 1,
               "dvae.n_init, dvae.n_blk_per_group and dvae.channels must be >= 1")
        _check(self.reconstruction_loss in ("logit_laplace", "gaussian"),
               f"dvae.reconstruction_loss={self.reconstruction_loss!r}: choose logit_laplace or gaussian")
        _check(self.gaussian_sigma > 0, f"dvae.gaussian_sigma={self.gaussian_sigma}: must be > 0")
        _check(self.init_pixel_value <= 1, f"dvae.init_pixel_value={self.init_pixel_value}: a pixel value in "
               f"[0, 1], or negative to keep the zero output bias")
        for name in ("kl_warmup_fraction", "temperature_anneal_fraction", "lr_anneal_fraction"):
            v = getattr(self, name)
            _check(0.0 <= v <= 1.0, f"dvae.{name}={v}: a fraction of dvae_train.steps, must be in [0, 1]")
        _check(self.kl_weight >= 0, "dvae.kl_weight must be >= 0")
        _check(not self.dead_code_restart,
               "dvae.dead_code_restart=true: dead-code restarts are not implemented (a trial on the shapes data "
               "did not help); leave it false")


# The attention types a layer may have (transformer/masks.py defines each and the paper's
# per-layer schedule).
ATTENTION_TYPES = ("row", "column", "conv", "full")


@dataclass
class TransformerConfig:
    dim: int = 512
    depth: int = 12
    heads: int = 8
    head_dim: int = 64
    text_vocab_size: int = 16384
    text_len: int = 256
    image_vocab_size: int = 8192
    image_grid: int = 32  # image tokens per side
    # "dalle" for the paper's schedule, or a comma-separated list of ATTENTION_TYPES, one per
    # layer (a shorter list repeats).
    attention_schedule: str = "dalle"
    conv_kernel: int = 11
    # Row attention on a W-wide grid sees the previous W + 1 image tokens (the paper's 4x4 figure
    # shows 5), i.e. ending with the same column one row up.
    row_window: int = 0  # 0: image_grid + 1
    backend: str = "dense"  # dense | flex | blocksparse
    block_size: int = 64
    # torch.compile the flex backend (tens of seconds on CPU the first time; eager flex is slow).
    compile_flex: bool = True
    mlp_ratio: int = 4
    # The paper does not state these. Pre-norm LayerNorm + GELU: the GPT-2/3 choice that the
    # paper's training recipe (lr 4.5e-4, clip 4) was designed around.
    activation: str = "gelu"
    norm: str = "layernorm"
    dropout: float = 0.0
    text_loss_weight: float = 1.0 / 8
    # Fraction of captions replaced by padding in training (classifier-free guidance); 0 = off.
    caption_drop: float = 0.0
    # The paper treats the per-position padding tokens as tokens: padded text positions are
    # predicted (target id 0) and counted in the text loss. False leaves them out of it.
    predict_padding: bool = True

    @property
    def image_len(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len


    def __post_init__(self) -> None:
        _check(self.dim == self.heads * self.head_dim,
               f"transformer.dim={self.dim} must equal heads*head_dim={self.heads}*{self.head_dim}"
               f"={self.heads * self.head_dim}")
        _check(self.depth >= 1, "transformer.depth must be >= 1")
        _check(self.backend in ("dense", "flex", "blocksparse"),
               f"transformer.backend={self.backend!r}: choose dense, flex or blocksparse")
        _check(self.block_size in (16, 32, 64, 128),
               f"transformer.block_size={self.block_size}: choose 16, 32, 64 or 128")
        _check(self.conv_kernel % 2 == 1 and self.conv_kernel >= 1,
               "transformer.conv_kernel must be an odd positive number")
        _check(self.activation in ("gelu", "relu", "swiglu"),
               f"transformer.activation={self.activation!r}: choose gelu, relu or swiglu")
        _check(self.norm in ("layernorm", "rmsnorm"), "transformer.norm must be layernorm or rmsnorm")
        _check(0 <= self.text_loss_weight <= 1, "transformer.text_loss_weight must be in [0, 1]")
        _check(0 <= self.caption_drop < 1, "transformer.caption_drop must be in [0, 1)")
        _check(self.row_window >= 0, "transformer.row_window must be >= 0 (0 = image_grid + 1)")
        _check(self.image_grid >= 1 and self.text_len >= 1,
               "transformer.image_grid and transformer.text_len must be >= 1")
        if self.attention_schedule != "dalle":
            parts = [t.strip() for t in self.attention_schedule.split(",") if t.strip()]
            bad = [t for t in parts if t not in ATTENTION_TYPES] if parts else ["(none)"]
            _check(not bad, f"transformer.attention_schedule has unknown types {bad}; "
                            f"use 'dalle' or a comma list of {ATTENTION_TYPES}")


@dataclass
class ClipConfig:
    """The small contrastive reranker trained on the same shards."""

    dim: int = 256
    embed_dim: int = 128
    text_depth: int = 4
    heads: int = 4
    image_channels: int = 64
    # Local OpenAI / open_clip checkpoint to use instead of our own reranker (optional).
    open_clip_model: str = ""
    open_clip_checkpoint: str = ""
    # Training augmentation: "none" by default because flips and off-centre crops contradict
    # captions that say where things are ("on the left").
    augment: str = "none"

    def __post_init__(self) -> None:
        _check(self.dim % self.heads == 0, f"clip.dim={self.dim} must be divisible by clip.heads={self.heads}")
        _check(self.embed_dim >= 1 and self.text_depth >= 1 and self.image_channels >= 1,
               "clip.embed_dim, clip.text_depth and clip.image_channels must be >= 1")
        _check(self.augment in ("stage1", "stage2", "none"),
               f"clip.augment={self.augment!r}: choose none, stage2 or stage1")
        _check(bool(self.open_clip_model) == bool(self.open_clip_checkpoint),
               "clip.open_clip_model and clip.open_clip_checkpoint go together: set both (e.g. ViT-B-32 and "
               "the path of its weights file) or neither")


@dataclass
class OptimizerConfig:
    lr: float = 4.5e-4
    beta1: float = 0.9
    beta2: float = 0.96
    eps: float = 1e-8
    weight_decay: float = 4.5e-2
    grad_clip: float = 4.0  # 0 disables
    # auto: DeepSpeed's fused Adam where built, else torch's fused/foreach AdamW.
    # apex is used only when chosen here and installed.
    impl: str = "auto"  # auto | torch | deepspeed | apex

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optimizer.lr must be > 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optimizer.beta1/beta2 must be in [0, 1)")
        _check(self.eps > 0, "optimizer.eps must be > 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay must be >= 0")
        _check(self.grad_clip >= 0, "optimizer.grad_clip must be >= 0 (0 disables clipping)")
        _check(self.impl in ("auto", "torch", "deepspeed", "apex"),
               f"optimizer.impl={self.impl!r}: choose auto, torch, deepspeed or apex")


@dataclass
class ScheduleConfig:
    # warmup_plateau: the paper's stage-2 schedule; cosine: stage 1; constant.
    kind: str = "warmup_plateau"
    warmup_steps: int = 5000
    min_lr: float = 0.0
    # Halve on plateau of the validation loss, at most `max_decays` times.
    plateau_factor: float = 0.5
    plateau_patience: int = 3  # validation evaluations without improvement
    plateau_threshold: float = 1e-3  # relative improvement that counts
    max_decays: int = 5

    def __post_init__(self) -> None:
        _check(self.kind in ("warmup_plateau", "cosine", "constant"),
               f"schedule.kind={self.kind!r}: choose warmup_plateau, cosine or constant")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
        _check(0 < self.plateau_factor < 1, "schedule.plateau_factor must be in (0, 1)")


@dataclass
class StagePrecisionConfig:
    """One training stage's own precision, over the shared `precision` section.

    mode "" (default): the stage runs in `precision` as it is. Otherwise the stage runs in this mode
    with this bf16_state, and takes the rest (loss-scale settings) from `precision`. So one config
    holds, e.g., a transformer with bf16 state beside a dVAE and a reranker with fp32 master
    weights, or an fp16_per_resblock transformer beside models that have no resblocks.
    Checked in Config (which knows the stage's name); Config.for_stage(section) resolves it.
    """

    mode: str = ""  # "" | fp32 | bf16 | fp16 | fp16_per_resblock (the transformer only)
    bf16_state: bool = False  # as precision.bf16_state; needs mode=bf16


@dataclass
class TrainConfig:
    """One training stage: batch arithmetic, length, optimizer, schedule, averaging."""

    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    # 0: derived as micro x accumulation x data-parallel ranks; otherwise checked against it.
    global_batch_size: int = 0
    seed: int = 0
    log_every: int = 10
    # Validation every N steps (0: never). The paper halves the stage-2 lr when the validation
    # loss plateaus but gives no cadence; 1000 updates judge a plateau (3 evaluations) over
    # 0.7% of its 430k updates, and 4 batches per evaluation cost ~0.4% of the training time.
    eval_every: int = 1000
    eval_batches: int = 4
    sample_every: int = 0  # 0: never
    ema_decay: float = 0.99
    ema_every: int = 25  # the paper's iterate averaging: every 25 updates, on CPU
    # Stage 2 only: train on deterministic random tokens instead of shards (benchmarks, tests).
    synthetic_data: bool = False
    # This stage's own precision (mode "" = the shared `precision` section); see StagePrecisionConfig.
    precision: StagePrecisionConfig = field(default_factory=StagePrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps must be >= 1")
        _check(self.micro_batch_size >= 1, "micro_batch_size must be >= 1")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1")
        _check(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        _check(self.ema_every >= 1, "ema_every must be >= 1")
        _check(self.eval_every >= 0, "eval_every must be >= 0 (0: never)")
        # Without evaluations the plateau rule never fires and the lr silently stays at its peak.
        _check(self.schedule.kind != "warmup_plateau" or self.eval_every > 0,
               "schedule.kind=warmup_plateau halves the lr when the validation loss stops improving, so it "
               "needs eval_every > 0 (e.g. 1000); or choose schedule.kind=constant (warm-up, then the peak) "
               "or cosine")

    def global_batch(self, world_size: int) -> int:
        derived = self.micro_batch_size * self.grad_accum_steps * world_size
        if self.global_batch_size and self.global_batch_size != derived:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} but micro_batch_size x grad_accum_steps x "
                f"data-parallel ranks = {self.micro_batch_size} x {self.grad_accum_steps} x {world_size} = "
                f"{derived}; set global_batch_size=0 to derive it or change the others")
        return derived


def _dvae_train_defaults() -> TrainConfig:
    # Stage 1 (paper): AdamW(0.9, 0.999, 1e-8, wd 1e-4), cosine lr 1e-4 -> 1.25e-6, EMA 0.999.
    return TrainConfig(
        steps=3_000_000, micro_batch_size=8, ema_decay=0.999, ema_every=1, eval_every=0,
        optimizer=OptimizerConfig(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-4, grad_clip=0.0),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=0, min_lr=1.25e-6),
    )


def _clip_train_defaults() -> TrainConfig:
    return TrainConfig(
        steps=2000, micro_batch_size=64, ema_decay=0.0, ema_every=1, eval_every=0,
        optimizer=OptimizerConfig(lr=5e-4, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(kind="cosine", warmup_steps=100, min_lr=1e-5),
    )


@dataclass
class PrecisionConfig:
    mode: str = "bf16"  # fp32 | bf16 | fp16 | fp16_per_resblock
    # Per-resblock scaling (paper appendix D); scales are multiplied by the data-parallel ranks M.
    init_scale_log2: float = 13.0
    min_scale_log2: float = 7.0
    max_scale_log2: float = 24.0
    growth_log2_per_step: float = 1.0 / 1000
    backoff_window: int = 125
    # Global loss scale for plain fp16 (DeepSpeed dynamic scaling).
    fp16_initial_scale_power: int = 16
    # bf16 master weights, gradients and Adam moments: no fp32 copy, 8 bytes per parameter instead
    # of 16, as the paper keeps its state in 16 bits (section 2.4). DeepSpeed's
    # bf16_master_weights_and_grads + bf16_optimizer_states; needs mode=bf16 and ZeRO 1-3.
    bf16_state: bool = False

    def __post_init__(self) -> None:
        _check(self.mode in ("fp32", "bf16", "fp16", "fp16_per_resblock"),
               f"precision.mode={self.mode!r}: choose fp32, bf16, fp16 or fp16_per_resblock")
        _check(self.min_scale_log2 <= self.init_scale_log2 <= self.max_scale_log2,
               "precision: need min_scale_log2 <= init_scale_log2 <= max_scale_log2")
        _check(self.backoff_window >= 1, "precision.backoff_window must be >= 1")
        _check(not self.bf16_state or self.mode == "bf16",
               f"precision.bf16_state=true keeps bf16 master weights and Adam moments; it needs precision.mode=bf16 "
               f"(it is {self.mode})")


@dataclass
class PowerSGDConfig:
    enabled: bool = False
    # 0: the paper's rank scaled to d_model (896 at d=3968, i.e. about 0.226 * d_model).
    rank: int = 0
    seed: int = 0
    orth_eps: float = 1e-6
    # Parameter names (fnmatch patterns) sent uncompressed in fp32 besides every nn.Embedding and
    # every gain/bias (< 2 dims): learned position/padding embeddings and the unembeddings
    # (text_head, image_head). Paper: embeddings, unembeddings, gains, biases.
    uncompressed: list[str] = field(default_factory=lambda: ["*embed*", "*head*", "*logits*"])
    # Width of the error-feedback buffers: bf16 | fp32 | auto. auto = bf16 under scheme=paper (the
    # paper keeps its state in 16 bits, and at 12B the buffers are 1/L of the matrices: 2.8 GiB per
    # GPU in 16 bits, 5.6 in 32), fp32 otherwise (the ZeRO 0/1 exchange is not memory-bound).
    error_dtype: str = "auto"

    def __post_init__(self) -> None:
        _check(self.rank >= 0, "distributed.powersgd.rank must be >= 0 (0 = derived from d_model)")
        _check(self.error_dtype in ("auto", "bf16", "fp32"),
               f"distributed.powersgd.error_dtype={self.error_dtype!r}: choose auto, bf16 or fp32")
        _check(0 < self.orth_eps < 1, "distributed.powersgd.orth_eps must be in (0, 1); the paper uses 1e-6")


    def resolved_error_dtype(self, scheme: str) -> str:
        return self.error_dtype if self.error_dtype != "auto" else ("bf16" if scheme == "paper" else "fp32")


def powersgd_refusal(zero_stage: int, precision_mode: str, scheme: str = "zero") -> str:
    """Why PowerSGD cannot run with this ZeRO stage, precision and scheme ("" when it can)."""
    if scheme == "paper":  # ZeRO-3 inside machines, PowerSGD on the partitions between them
        if precision_mode == "fp16":
            return ("distributed.scheme=paper with PowerSGD does not work with precision.mode=fp16: DeepSpeed's "
                    "global loss scaler would never learn about the steps the exchange skips. Use "
                    "precision.mode=bf16 (with precision.bf16_state=true for the paper's 16-bit state), fp32 or "
                    "fp16_per_resblock")
        return ""
    if zero_stage not in (0, 1):
        return (f"distributed.powersgd.enabled=true works with distributed.zero_stage 0 or 1, not {zero_stage}: "
                f"ZeRO-2/3 reduce each gradient inside DeepSpeed's backward hooks over all ranks, which would "
                f"send it uncompressed between machines. Set --distributed.zero_stage=1 (optimizer states stay "
                f"partitioned), or --distributed.scheme=paper with zero_stage 3 (ZeRO-3 inside each machine, "
                f"PowerSGD between machines), or --distributed.powersgd.enabled=false")
    if precision_mode == "fp16":
        return ("distributed.powersgd.enabled=true does not work with precision.mode=fp16: DeepSpeed's global "
                "loss scaler would never learn about the steps the exchange skips. Use precision.mode=bf16, "
                "fp32 or fp16_per_resblock")
    return ""


@dataclass
class DistributedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    activation_checkpointing: bool = False
    checkpoint_every_k: int = 1  # checkpoint one resblock in k
    # Recompute with torch.utils.checkpoint (non-reentrant) or deepspeed.checkpointing.
    checkpoint_impl: str = "torch"  # torch | deepspeed
    # 0: taken from the launcher (LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE). Set it to pretend
    # several "machines" on one host (e.g. 2 with 4 processes = 2 machines x 2 ranks).
    gpus_per_node: int = 0
    timeout_s: int = 600  # a dead rank ends the job within this many seconds
    # "zero": DeepSpeed's ZeRO over all ranks (zero_stage). "paper": the paper's scheme (section
    # 2.5): ZeRO-3 inside each machine, machines as replicas averaging their gradient partitions
    # (distributed/replicas.py).
    scheme: str = "zero"
    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"distributed.zero_stage={self.zero_stage}: choose 0, 1, 2 or 3")
        _check(self.backend in ("auto", "nccl", "gloo"), "distributed.backend must be auto, nccl or gloo")
        _check(self.checkpoint_every_k >= 1, "distributed.checkpoint_every_k must be >= 1")
        _check(self.checkpoint_impl in ("torch", "deepspeed"),
               f"distributed.checkpoint_impl={self.checkpoint_impl!r}: choose torch or deepspeed")
        _check(self.gpus_per_node >= 0, "distributed.gpus_per_node must be >= 0")
        _check(self.timeout_s >= 1, "distributed.timeout_s must be >= 1")
        _check(self.scheme in ("zero", "paper"), f"distributed.scheme={self.scheme!r}: choose zero or paper")
        _check(self.scheme != "paper" or self.zero_stage == 3,
               f"distributed.scheme=paper shards parameters, gradients and optimizer state with ZeRO-3 inside each "
               f"machine; set distributed.zero_stage=3 (it is {self.zero_stage})")
        _check(self.scheme != "paper" or not self.offload_optimizer,
               "distributed.scheme=paper averages DeepSpeed's on-device gradient partitions between machines; "
               "set distributed.offload_optimizer=false")
        _check(not (self.offload_optimizer and self.zero_stage == 0),
               "distributed.offload_optimizer needs zero_stage >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step forever; 0: off
    resume: str = "latest"  # latest | none | <path to a checkpoint folder>
    # Fine-tuning: start a new run from the weights of an export, run or stage folder (fresh
    # optimizer, schedule and step count); a checkpoint to resume from wins (training/init_weights.py).
    init_from: str = ""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 1, "checkpoint.every_steps must be >= 1")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        _check(self.keep_every >= 0, "checkpoint.keep_every must be >= 0")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megadalle"
    progress: bool = True


@dataclass
class SamplingConfig:
    n: int = 64
    top: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.n >= 1 and 1 <= self.top <= self.n, "sampling: need n >= 1 and 1 <= top <= n")
        _check(self.temperature > 0, "sampling.temperature must be > 0")
        _check(0 < self.top_p <= 1, "sampling.top_p must be in (0, 1]")
        _check(self.top_k >= 0, "sampling.top_k must be >= 0 (0 disables)")


TRAIN_SECTIONS = ("dvae_train", "train", "clip_train")
PRECISION_MODES = ("fp32", "bf16", "fp16", "fp16_per_resblock")
# Stages whose model is made of resblocks with a runner (the transformer): fp16_per_resblock scales
# those; the dVAE's bottleneck blocks and the reranker have no runner to scale through.
_RESBLOCK_SECTIONS = ("train",)
_STAGE_MODELS = {"dvae_train": "the dVAE", "train": "the transformer", "clip_train": "the reranker (CLIP)"}


def _no_resblocks(section: str, mode: str, inherited: bool = False) -> str:
    said = f"precision.mode={mode} (which {section} inherits)" if inherited else f"{section}.precision.mode={mode}"
    return (f"{said}: per-resblock gradient scaling needs the transformer's resblocks and {_STAGE_MODELS[section]} "
            f"has none. Give this stage its own mode: --{section}.precision.mode=bf16 (or fp32, or fp16 on a GPU)")


@dataclass
class Config:
    preset: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dvae: DVAEConfig = field(default_factory=DVAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    dvae_train: TrainConfig = field(default_factory=_dvae_train_defaults)
    train: TrainConfig = field(default_factory=TrainConfig)
    clip_train: TrainConfig = field(default_factory=_clip_train_defaults)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        t, d = self.transformer, self.dvae
        _check(t.image_grid == d.grid_size,
               f"transformer.image_grid={t.image_grid} but the dVAE makes a {d.grid_size}x{d.grid_size} grid "
               f"(dvae.image_size={d.image_size} / 2^(group_count-1)); make them agree")
        _check(t.image_vocab_size == d.vocab_size,
               f"transformer.image_vocab_size={t.image_vocab_size} must equal dvae.vocab_size={d.vocab_size}")
        _check(t.text_vocab_size == self.tokenizer.vocab_size,
               f"transformer.text_vocab_size={t.text_vocab_size} must equal tokenizer.vocab_size="
               f"{self.tokenizer.vocab_size}")
        _check(t.text_len == self.tokenizer.text_len,
               f"transformer.text_len={t.text_len} must equal tokenizer.text_len={self.tokenizer.text_len}")
        _check(self.data.image_size == d.image_size,
               f"data.image_size={self.data.image_size} must equal dvae.image_size={d.image_size}")
        # Static compatibility rules are refused here, before DeepSpeed starts.
        _check(not self.precision.bf16_state or self.distributed.zero_stage >= 1,
               "precision.bf16_state=true is a ZeRO optimizer option (DeepSpeed's bf16_master_weights_and_grads); "
               "set distributed.zero_stage to 1, 2 or 3")
        _check(not (self.precision.bf16_state and self.distributed.offload_optimizer),
               "precision.bf16_state=true with distributed.offload_optimizer=true needs DeepSpeed's CPU Adam "
               "storing bf16 moments; set distributed.offload_optimizer=false")
        if self.distributed.powersgd.enabled:
            problem = powersgd_refusal(self.distributed.zero_stage, self.precision.mode, self.distributed.scheme)
            _check(not problem, problem)
        self._check_stage_precision()

    # ---- per-stage precision ----
    def _check_stage_precision(self) -> None:
        """The precision rules above, for each stage that sets its own mode (messages name its keys).
        fp16_per_resblock on a model without resblocks is refused by for_stage."""
        for section in TRAIN_SECTIONS:
            own = getattr(self, section).precision
            key = f"{section}.precision"
            if not own.mode:
                _check(not own.bf16_state, f"{key}.bf16_state=true needs {key}.mode=bf16 as well ({key}.mode '' "
                                           f"means: use the shared precision section, precision.bf16_state included)")
                continue
            _check(own.mode in PRECISION_MODES,
                   f"{key}.mode={own.mode!r}: choose {', '.join(PRECISION_MODES)}, or '' for precision.mode")
            _check(not own.bf16_state or own.mode == "bf16",
                   f"{key}.bf16_state=true keeps bf16 master weights and Adam moments; it needs {key}.mode=bf16 "
                   f"(it is {own.mode})")
            _check(not own.bf16_state or self.distributed.zero_stage >= 1,
                   f"{key}.bf16_state=true is a ZeRO optimizer option (DeepSpeed's bf16_master_weights_and_grads); "
                   f"set distributed.zero_stage to 1, 2 or 3")
            _check(not (own.bf16_state and self.distributed.offload_optimizer),
                   f"{key}.bf16_state=true with distributed.offload_optimizer=true needs DeepSpeed's CPU Adam "
                   f"storing bf16 moments; set distributed.offload_optimizer=false")
            if self.distributed.powersgd.enabled:
                problem = powersgd_refusal(self.distributed.zero_stage, own.mode, self.distributed.scheme)
                _check(not problem, f"{key}.mode={own.mode} (this stage's precision.mode): {problem}")

    def precision_for(self, section: str) -> PrecisionConfig:
        """The precision training stage `section` runs in: `precision`, with the stage's own mode and
        bf16_state where it sets a mode."""
        if section not in TRAIN_SECTIONS:
            raise ConfigError(f"unknown training section {section!r}; use {', '.join(TRAIN_SECTIONS)}")
        own = getattr(self, section).precision
        if not own.mode or (own.mode, own.bf16_state) == (self.precision.mode, self.precision.bf16_state):
            return self.precision
        return dataclasses.replace(self.precision, mode=own.mode, bf16_state=own.bf16_state)

    def for_stage(self, section: str) -> "Config":
        """This config as the trainer of `section` uses it: `precision` is that stage's own.

        Everything downstream (DeepSpeed's JSON, install_precision, PowerSGD's checks, checkpoint
        metadata) reads `cfg.precision`, so a stage trainer works on this copy. The other stages'
        modes are written out in it, so that the copy the trainer saves in its folder and its
        checkpoints loads back to the same precision for every stage. Returns `self` when the stage
        runs in the shared `precision`.
        """
        prec = self.precision_for(section)
        # Refused here, when the stage starts, rather than on loading: a config whose dVAE would
        # inherit it still serves the transformer, and the copies below write every mode out.
        if prec.mode == "fp16_per_resblock" and section not in _RESBLOCK_SECTIONS:
            raise ConfigError(_no_resblocks(section, "fp16_per_resblock", inherited=prec is self.precision))
        if prec is self.precision:
            return self
        d = self.to_dict()
        for s in TRAIN_SECTIONS:
            own = self.precision_for(s)
            d[s]["precision"] = {"mode": own.mode, "bf16_state": own.bf16_state}
        d["precision"] = dataclasses.asdict(prec)
        return Config.from_dict(d)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return build_dataclass(cls, d, "")

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        return cls.from_dict(read_yaml(path))

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted overrides applied and everything validated again."""
        d = self.to_dict()
        for key, value in overrides.items():
            set_dotted(d, key.replace("__", "."), value, Config)
        return Config.from_dict(d)


__all__ = ["ShapesConfig", "DataConfig", "TokenizerConfig", "DVAEConfig", "ATTENTION_TYPES", "TransformerConfig", "ClipConfig", "OptimizerConfig", "ScheduleConfig", "StagePrecisionConfig", "TrainConfig", "PrecisionConfig", "PowerSGDConfig", "DistributedConfig", "CheckpointConfig", "LoggingConfig", "SamplingConfig", "Config", "powersgd_refusal", "TRAIN_SECTIONS", "PRECISION_MODES"]
