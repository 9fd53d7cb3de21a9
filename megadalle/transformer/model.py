"""The stage-2 transformer: one decoder over the joint text + image token stream.

The paper (Ramesh et al. 2021, section 2.2 and appendix B.1) fixes: text of at most 256 BPE
tokens (vocabulary 16,384) with 256 distinct learned padding tokens, a 32x32 grid of image tokens
(vocabulary 8192), a decoder-only sparse transformer over the 1280-token stream, row / column /
convolutional attention masks, and a cross-entropy loss weighted 1/8 text and 7/8 image.

Choices the paper leaves open, and why:

* Stream: position p holds the previous token and predicts x_p (see masks.py): BOS, t_0 ..
  t_{T-1}, c_0 .. c_{N-2}. That keeps the stream at exactly T + N = 1280 positions (block
  aligned), predicts every token including t_0, and predicts c_0 from the position holding the
  last text token (the start of the image needs no extra token).
* Text id 0 is padding (tokenizer contract). A padded position i is embedded with its own
  learned padding vector pad[i] (256 of them at full size) instead of the token table, as in
  the paper. Padding is predicted as id 0 and counted in the text loss by default
  (`predict_padding`; the paper treats the padding tokens as tokens, and predicting where a
  caption ends is what lets the model's text distribution be sampled at all).
* Image tokens: token embedding + learned row embedding + learned column embedding.
* Pre-norm residual blocks (GPT-2/3), GELU MLP of width 4 d: what the paper's optimiser
  settings were tuned around. Attention and MLP are separate resblocks, each with
  `branch(x)`; `forward` runs `x = self.resblock_runner(block, x)` so the training system can
  wrap blocks (activation checkpointing, per-resblock gradient scaling) without the model
  knowing about it.
* Two output heads: text logits over the text vocabulary, image logits over the image
  vocabulary only, both computed in fp32 from the final norm.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from megadalle.config import TransformerConfig
from megadalle.transformer.attention import attention
from megadalle.transformer.masks import MaskGeometry, layer_types, mask_set

ResblockRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def default_resblock_runner(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.branch(x)


def _norm(cfg: TransformerConfig) -> nn.Module:
    return nn.LayerNorm(cfg.dim) if cfg.norm == "layernorm" else nn.RMSNorm(cfg.dim)


class AttentionBlock(nn.Module):
    """Pre-norm masked self-attention; `branch(x)` is the residual function."""

    def __init__(self, cfg: TransformerConfig, layer_type: str, geometry: MaskGeometry) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.geometry = geometry
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.backend, self.block_size, self.compile_flex = cfg.backend, cfg.block_size, cfg.compile_flex
        self.norm = _norm(cfg)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, L, dim) -> q, k, v each (batch, heads, L, head_dim)."""
        B, L, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o (batch, heads, L, head_dim) -> (batch, L, dim)."""
        B, H, L, D = o.shape
        return self.drop(self.proj(o.transpose(1, 2).reshape(B, L, H * D)))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        masks = mask_set(self.geometry, self.layer_type, x.shape[1])
        o = attention(*self.project_qkv(x), masks, self.backend, block_size=self.block_size,
                      compile_flex=self.compile_flex)
        return self.project_out(o)


class MLPBlock(nn.Module):
    """Pre-norm MLP; `branch(x)` is the residual function."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm = _norm(cfg)
        hidden = cfg.mlp_ratio * cfg.dim
        self.swiglu = cfg.activation == "swiglu"
        if self.swiglu:
            # Two thirds of the width keeps the parameter count of the plain MLP.
            hidden = int(2 * hidden / 3)
            self.fc_in = nn.Linear(cfg.dim, 2 * hidden)
        else:
            self.fc_in = nn.Linear(cfg.dim, hidden)
        self.act = nn.GELU() if cfg.activation == "gelu" else nn.ReLU()
        self.fc_out = nn.Linear(hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(self.norm(x))
        if self.swiglu:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = self.act(h)
        return self.drop(self.fc_out(h))


class DALLETransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.geometry = MaskGeometry.from_config(cfg)
        T, d = cfg.text_len, cfg.dim
        self.bos = nn.Parameter(torch.zeros(d))
        self.text_embed = nn.Embedding(cfg.text_vocab_size, d)
        self.pad_embed = nn.Parameter(torch.zeros(T, d))  # one learned padding token per position
        self.text_pos_embed = nn.Parameter(torch.zeros(T, d))
        self.image_embed = nn.Embedding(cfg.image_vocab_size, d)
        self.row_embed = nn.Parameter(torch.zeros(cfg.image_grid, d))
        self.col_embed = nn.Parameter(torch.zeros(cfg.image_grid, d))
        self.layer_types = layer_types(cfg)
        blocks: list[nn.Module] = []
        for kind in self.layer_types:
            blocks += [AttentionBlock(cfg, kind, self.geometry), MLPBlock(cfg)]
        self.resblocks = nn.ModuleList(blocks)
        self.final_norm = _norm(cfg)
        self.text_head = nn.Linear(d, cfg.text_vocab_size)
        self.image_head = nn.Linear(d, cfg.image_vocab_size)
        self.resblock_runner: ResblockRunner = default_resblock_runner
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 initialisation: N(0, 0.02), with the projections that write into the residual
        # stream scaled by 1/sqrt(number of resblocks) so the stream's variance does not grow
        # with depth.
        out_std = 0.02 / math.sqrt(len(self.resblocks))
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:  # LayerNorm / RMSNorm gains
                nn.init.ones_(p)
            elif name.endswith(("proj.weight", "fc_out.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=0.02)

    # ---- embeddings ----
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text long (B, T), 0 = padding -> (B, T + 1, dim): BOS then one position per token."""
        B, T = text.shape
        if T != self.cfg.text_len:
            raise ValueError(f"text has {T} tokens per caption; the model takes text_len={self.cfg.text_len}")
        tok = self.text_embed(text)
        tok = torch.where((text == 0).unsqueeze(-1), self.pad_embed.to(tok.dtype), tok) + self.text_pos_embed
        return torch.cat([self.bos.to(tok.dtype).expand(B, 1, -1), tok], dim=1)

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """codes long (B, n) holding image tokens start .. start+n-1 (raster order) -> (B, n, dim)."""
        n, W = codes.shape[1], self.cfg.image_grid
        idx = torch.arange(start, start + n, device=codes.device)
        return self.image_embed(codes) + self.row_embed[idx // W] + self.col_embed[idx % W]

    def embed(self, text: torch.Tensor, codes_in: torch.Tensor) -> torch.Tensor:
        """Input stream: BOS, text, then the image tokens fed so far -> (B, T + 1 + n_in, dim)."""
        return torch.cat([self.embed_text(text), self.embed_image(codes_in)], dim=1)

    # ---- trunk and heads ----
    def hidden(self, text: torch.Tensor, codes_in: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of the stream fed with `codes_in` (B, n_in < N)."""
        if codes_in.shape[1] > self.cfg.image_len - 1:
            raise ValueError(f"at most {self.cfg.image_len - 1} image tokens are fed as input, "
                             f"got {codes_in.shape[1]}")
        x = self.embed(text, codes_in)
        for block in self.resblocks:
            x = self.resblock_runner(block, x)
        return self.final_norm(x)

    def text_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.text_head.weight.float(), self.text_head.bias.float())

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h.float(), self.image_head.weight.float(), self.image_head.bias.float())

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text long (B, T), codes long (B, n), 1 <= n <= N ->
        (text_logits fp32 (B, T, Vt), image_logits fp32 (B, n, Vi)); logits[:, i] predict token i."""
        self._check_inputs(text, codes)
        h = self.hidden(text, codes[:, :-1])  # (B, T + n, dim); the last code is only a target
        T = self.cfg.text_len
        return self.text_logits(h[:, :T]), self.image_logits(h[:, T:])

    def loss(self, text: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """w * text CE + (1 - w) * image CE, each averaged over its own tokens (w = text_loss_weight)."""
        text_logits, image_logits = self(text, codes)
        text_targets = text if self.cfg.predict_padding else text.masked_fill(text == 0, -100)
        n_text = (text_targets != -100).sum()
        text_loss = F.cross_entropy(text_logits.flatten(0, 1), text_targets.flatten(), ignore_index=-100,
                                    reduction="sum") / n_text.clamp(min=1)
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), codes.flatten())
        w = self.cfg.text_loss_weight
        return {"loss": w * text_loss + (1 - w) * image_loss, "text_loss": text_loss, "image_loss": image_loss}

    def _check_inputs(self, text: torch.Tensor, codes: torch.Tensor) -> None:
        c = self.cfg
        if text.dim() != 2 or codes.dim() != 2 or text.shape[0] != codes.shape[0]:
            raise ValueError(f"expected text (B, {c.text_len}) and codes (B, n); got {tuple(text.shape)} "
                             f"and {tuple(codes.shape)}")
        if not 1 <= codes.shape[1] <= c.image_len:
            raise ValueError(f"codes must hold 1 .. {c.image_len} image tokens, got {codes.shape[1]}")
        if text.device.type != "meta":
            # One host sync for both checks; an out-of-range id would otherwise be an opaque
            # device-side assert on GPU.
            bad = torch.stack([((text < 0) | (text >= c.text_vocab_size)).any(),
                               ((codes < 0) | (codes >= c.image_vocab_size)).any()]).tolist()
            if bad[0]:
                raise ValueError(f"text ids must be in [0, {c.text_vocab_size})")
            if bad[1]:
                raise ValueError(f"image codes must be in [0, {c.image_vocab_size})")

    @property
    def attention_blocks(self) -> list[AttentionBlock]:
        return [b for b in self.resblocks if isinstance(b, AttentionBlock)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
