"""Image generation with a KV cache, and the full-recomputation path it must agree with.

Each attention layer keeps the keys and values of every position fed so far. A new position p
attends to the cached keys its layer's element-level mask allows (row p of the raster-order
mask from masks.py), so sparse layers stay sparse while decoding and the column layers'
transposed-grid permutation, which only reorders positions, needs no special case.

`generate` feeds the prompt (BOS, the caption and any given first image tokens) in one pass,
then one image token per step. With `use_cache=False` every step recomputes the whole stream
instead; both paths draw their random numbers identically, so with the same generator they
produce the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megadalle.transformer.masks import mask_set
from megadalle.transformer.model import AttentionBlock, DALLETransformer


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per attention block: (batch, heads, S, head_dim)
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, model: DALLETransformer, batch: int, device: torch.device, dtype: torch.dtype) -> "KVCache":
        c = model.cfg
        shape = (batch, c.heads, c.seq_len, c.head_dim)
        n = len(model.attention_blocks)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)])


def forward_cached(model: DALLETransformer, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Run embeddings x (B, L, dim) of positions start .. start+L-1 through the trunk, filling the
    cache; returns their final-norm hidden states (B, L, dim)."""
    L, end = x.shape[1], start + x.shape[1]
    S = model.cfg.seq_len
    layer = 0
    for block in model.resblocks:
        if isinstance(block, AttentionBlock):
            q, k, v = block.project_qkv(x)  # (B, H, L, D)
            cache.keys[layer][:, :, start:end] = k
            cache.values[layer][:, :, start:end] = v
            rows = mask_set(model.geometry, block.layer_type, S).on("raster", x.device)[start:end, :end]
            o = F.scaled_dot_product_attention(q, cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end],
                                               attn_mask=rows)
            x = x + block.project_out(o)
            layer += 1
        else:
            x = x + block.branch(x)
    return model.final_norm(x)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> temperature-scaled logits with everything outside top-k / top-p at -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the most
        # likely token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform number per row: (B, V) -> long (B,).

    One draw per row whatever the logits are keeps the cached and uncached paths in lock-step
    on the generator.
    """
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    gen_device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=gen_device).to(logits.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp(max=logits.shape[-1] - 1).squeeze(-1)


@torch.no_grad()
def generate(model: DALLETransformer, text: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, guidance_scale: float = 1.0, prefix_codes: torch.Tensor | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sample image tokens for captions `text` long (B, T) -> codes long (B, N).

    prefix_codes long (B, k): the first k image tokens are given (image completion) and copied
    to the output. guidance_scale s != 1 mixes the caption's logits with those of the null
    caption (all padding): uncond + s * (cond - uncond). on_step(j) is called after token j.
    """
    c = model.cfg
    N, T = c.image_len, c.text_len
    if text.dim() != 2 or text.shape[1] != T:
        raise ValueError(f"text must be (batch, {T}), got {tuple(text.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {top_k}")
    B, device = text.shape[0], text.device
    k = 0 if prefix_codes is None else prefix_codes.shape[1]
    codes = torch.zeros(B, N, dtype=torch.long, device=device)
    if prefix_codes is not None:
        if prefix_codes.dim() != 2 or prefix_codes.shape[0] != B or k > N:
            raise ValueError(f"prefix_codes must be (batch={B}, k <= {N}), got {tuple(prefix_codes.shape)}")
        if k and not (0 <= int(prefix_codes.min()) and int(prefix_codes.max()) < c.image_vocab_size):
            raise ValueError(f"prefix_codes must be in [0, {c.image_vocab_size})")
        codes[:, :k] = prefix_codes
    if k == N:
        return codes

    guided = guidance_scale != 1.0
    # Guidance runs the caption and the null caption as one batch of 2B.
    stream_text = torch.cat([text, torch.zeros_like(text)]) if guided else text

    def stream_codes(n: int) -> torch.Tensor:
        return torch.cat([codes[:, :n], codes[:, :n]]) if guided else codes[:, :n]

    def next_token(h_last: torch.Tensor) -> torch.Tensor:
        logits = model.image_logits(h_last)  # (B or 2B, Vi) fp32
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        return sample_from_logits(filter_logits(logits, temperature, top_k, top_p), generator)

    was_training = model.training
    model.eval()
    try:
        if use_cache:
            dtype = next(model.parameters()).dtype
            cache = KVCache.allocate(model, stream_text.shape[0], device, dtype)
            h = forward_cached(model, model.embed(stream_text, stream_codes(k)), cache, 0)
            for j in range(k, N):
                codes[:, j] = next_token(h[:, -1])
                if on_step:
                    on_step(j)
                if j + 1 < N:
                    # Position T + 1 + j holds c_j and predicts c_{j+1}.
                    x = model.embed_image(stream_codes(j + 1)[:, j:], start=j)
                    h = forward_cached(model, x, cache, T + 1 + j)
        else:
            for j in range(k, N):
                h = model.hidden(stream_text, stream_codes(j))
                codes[:, j] = next_token(h[:, -1])
                if on_step:
                    on_step(j)
    finally:
        model.train(was_training)
    return codes
