"""Masked attention behind one function, with the backend chosen by `transformer.backend`.

* `dense`: `scaled_dot_product_attention` with the boolean mask; the reference.
* `flex`: `torch.nn.attention.flex_attention` with a BlockMask built once per (layer type,
  stream length, device, block size) and cached in the MaskSet; `torch.compile`d when
  `compile_flex` is set (the eager fallback materialises the scores, so it is only a reference).
* `blocksparse`: `megadalle.ops.block_sparse_attention.block_sparse_attention(q, k, v, layout,
  scale)` on the BlockLayout of the mask, imported on first use.

Column layers attend on the transposed image grid: q/k/v are reordered with the MaskSet's
permutation before the backend runs, and the output is put back into raster order after, so
callers always see raster order.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from megadalle.config import ConfigError
from megadalle.transformer.masks import MaskSet

log = logging.getLogger(__name__)

BACKENDS = ("dense", "flex", "blocksparse")

_compiled_flex: Callable | None = None
_compile_failed = False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: MaskSet, backend: str = "dense", *,
              block_size: int = 64, compile_flex: bool = True) -> torch.Tensor:
    """q, k, v: (batch, heads, L, head_dim) in raster order -> (batch, heads, L, head_dim)."""
    if q.dim() != 4 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must all be (batch, heads, seq, head_dim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != masks.length:
        raise ValueError(f"sequence length {q.shape[2]} does not match the mask's {masks.length}")
    scale = q.shape[-1] ** -0.5
    perm = masks.on("perm", q.device) if masks.perm is not None else None
    if perm is not None:
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    if backend == "dense":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks.on("mask", q.device), scale=scale)
    elif backend == "flex":
        if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                                    or v.requires_grad):
            raise ConfigError("transformer.backend=flex: FlexAttention has no backward pass on CPU in "
                              "this torch; train on CPU with transformer.backend=dense (flex works "
                              "on CPU for inference and on GPU for both)")
        # On GPU the BlockMask uses flex's own 128 tile, which its kernels are tuned for; on CPU
        # the configured block size.
        flex_block = block_size if q.device.type == "cpu" else 128
        out = _flex(q, k, v, masks.flex_block_mask(q.device, flex_block), scale, compile_flex)
    elif backend == "blocksparse":
        out = _block_sparse()(q.contiguous(), k.contiguous(), v.contiguous(), masks.layout(block_size), scale)
    else:
        raise ConfigError(f"transformer.backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if perm is not None:
        out = out.index_select(2, masks.on("inv_perm", q.device))
    return out


def _flex(q, k, v, block_mask, scale: float, compile_flex: bool) -> torch.Tensor:
    global _compiled_flex, _compile_failed
    from torch.nn.attention.flex_attention import flex_attention

    if compile_flex and not _compile_failed:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        try:
            return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
        except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same maths
            _compile_failed = True
            log.warning("torch.compile(flex_attention) failed (%s: %s); using eager flex attention, "
                        "which is slow", type(e).__name__, e)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def _block_sparse() -> Callable:
    try:
        from megadalle.ops.block_sparse_attention import block_sparse_attention
    except ModuleNotFoundError as e:
        if e.name != "megadalle.ops.block_sparse_attention":
            raise
        raise ConfigError("transformer.backend=blocksparse needs megadalle.ops.block_sparse_attention "
                          "(the block-sparse kernel), which this checkout does not have yet; "
                          "use transformer.backend=dense or flex") from None
    return block_sparse_attention


def block_sparse_available() -> bool:
    try:
        _block_sparse()
    except ConfigError:
        return False
    return True
