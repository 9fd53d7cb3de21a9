"""Named configurations: nested dicts applied over the defaults (`--preset NAME`)."""

from __future__ import annotations

from typing import Any


def _transformer_preset(dim: int, depth: int, heads: int) -> dict[str, Any]:
    return {"transformer": {"dim": dim, "depth": depth, "heads": heads, "head_dim": dim // heads}}


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: 48 px shapes -> 12x12 tokens from a 512-code dVAE, short captions, 4 layers.
    "tiny": {
        # No stage-1 augmentation: its zoom (up to 1.5x, bicubic) shows the dVAE larger, blurred
        # objects than the un-augmented images it encodes for stage 2 and is checked on.
        "data": {"image_size": 48, "shuffle_buffer": 256, "augment": "none"},
        # No BPE dropout (the paper: 0.1): captions of ~30 distinct words and ~1k updates leave
        # nothing for it to regularise, and the demo's transformer trained without it matched
        # its caption in 85% of seen and 34% of held-out samples instead of 71% and 22%
        # (same tokens, same budget; README, "The demo").
        "tokenizer": {"vocab_size": 512, "text_len": 32, "min_frequency": 1, "bpe_dropout": 0.0},
        # dVAE tuned for a few CPU minutes (measured, see README): one block per group (~2.7x the
        # steps/s of two at half the batch); the KL weight from the start and a slow temperature
        # anneal, because short runs otherwise collapse onto one code (the paper's 5k-update beta
        # warm-up assumes millions of updates); EMA 0.99 so the export is not mostly init. The
        # Gaussian reconstruction term and an output starting at the white background: with the
        # paper's logit-Laplace and zero bias, 1000 updates keep the facts of 0-3% of held-out
        # images (colours lost), with these ~50%. 48 px with three groups (4x4-pixel patches, 12x12
        # tokens) rather than 64 px with four (8x8 patches): the 8x8 patches come back with the
        # shapes rounded off (~50% of facts kept), the 4x4 ones keep ~95% after 2000 updates.
        "dvae": {"image_size": 48, "group_count": 3, "n_hid": 32, "n_init": 32, "vocab_size": 512,
                 "n_blk_per_group": 1,
                 "kl_warmup_fraction": 0.0, "temperature_anneal_fraction": 0.8, "lr_anneal_fraction": 1.0,
                 "reconstruction_loss": "gaussian", "init_pixel_value": 1.0},
        "transformer": {"dim": 128, "depth": 4, "heads": 4, "head_dim": 32, "text_vocab_size": 512,
                        "text_len": 32, "image_vocab_size": 512, "image_grid": 12, "conv_kernel": 5,
                        "block_size": 16},
        "clip": {"dim": 128, "embed_dim": 64, "text_depth": 2, "heads": 4, "image_channels": 32},
        "dvae_train": {"steps": 2000, "micro_batch_size": 16, "log_every": 50, "ema_decay": 0.99,
                       "optimizer": {"lr": 1e-3}, "schedule": {"min_lr": 1e-5}},
        # Warm-up then constant, with no evaluations: ~1k updates on the demo's data never
        # reach a plateau the paper's halving rule would act on, and evaluating costs demo time.
        "train": {"steps": 2000, "micro_batch_size": 32, "log_every": 50, "eval_every": 0,
                  "optimizer": {"lr": 1e-3}, "schedule": {"kind": "constant", "warmup_steps": 100}},
        "clip_train": {"steps": 600, "micro_batch_size": 64},
        "precision": {"mode": "fp32"},
        "checkpoint": {"every_steps": 500},
        "sampling": {"n": 16, "top": 4},
    },
    # The paper's token geometry (256 text + 32x32 image) at a size a single GPU trains.
    "small": {**_transformer_preset(512, 12, 8)},
    # Not given by the paper; GPT-3-like shapes with head size 64 and the 64-layer-style
    # schedule, sized to the names.
    "1.3b": {**_transformer_preset(2048, 24, 32)},
    "2.8b": {**_transformer_preset(2560, 32, 40)},
    "5.6b": {**_transformer_preset(3072, 48, 48)},
    # The paper: 64 layers, 62 heads of 64, d_model 3968, trained with its own distributed scheme
    # (distributed/replicas.py, partition_powersgd.py): ZeRO-3 inside each machine, PowerSGD at
    # rank 896 (112 per GPU) between machines, 16-bit state. The state is bf16 (DeepSpeed's bf16
    # master weights and Adam moments) rather than the paper's fp16 with per-resblock scaling:
    # DeepSpeed 0.19 keeps an fp32 master copy under any fp16 mode without optimizer offload
    # (16 instead of 8 bytes a parameter), and bf16's 8-bit exponent has the range that made the
    # paper scale each resblock's fp16 gradients (precision.mode=fp16_per_resblock still runs with
    # this scheme, at fp32 state). `megadalle plan --preset 12b` shows what each GPU holds.
    # The dVAE and the reranker train in bf16 with fp32 master weights and Adam moments. The paper
    # ran its dVAE in fp16 with the encoder's last and the decoder's first conv in fp32 (our
    # Conv2d(fp32=True)) and says neither how it scaled that loss nor how wide the dVAE's state was;
    # it trained no reranker (it used CLIP). 16-bit state is what lets 12B fit; ~100M-parameter
    # models need no such saving, and the dVAE's lr decays to 1.25e-6, far below half a bf16 step of
    # its weights (a step is 1.2e-4 at 0.02), so bf16 master weights would stop learning. bf16
    # compute needs no loss scale and runs on CPUs and A100/H100s; V100s lack bf16: there, set
    # dvae_train.precision.mode and clip_train.precision.mode to fp16 (one dynamic loss scale).
    "12b": {**_transformer_preset(3968, 64, 62), "precision": {"mode": "bf16", "bf16_state": True},
            "distributed": {"zero_stage": 3, "scheme": "paper", "activation_checkpointing": True,
                            "powersgd": {"enabled": True, "rank": 896}},
            "dvae_train": {"precision": {"mode": "bf16", "bf16_state": False}},
            "clip_train": {"precision": {"mode": "bf16", "bf16_state": False}},
            "train": {"steps": 430_000, "micro_batch_size": 1}},
}

