"""Block-sparse attention: the `blocksparse` backend of the transformer's attention.

    block_sparse_attention(q, k, v, layout, scale=None) -> out
        q, k, v: [B, H, S, D] (S = layout.seq_len); out: [B, H, S, D]. Differentiable.
    block_sparse_attention_decode(q, k_cache, v_cache, layout, pos, scale=None) -> out
        One new query token at sequence position `pos`: q [B, H, 1, D] against a KV cache
        [B, H, cache_len, D] (cache_len > pos; only keys 0..pos are read), allowed keys = row `pos`
        of the layout. Equals row `pos` of block_sparse_attention for a causal layout.

Both compute softmax(scale * q k^T) v over the keys the layout allows (element masks inside
partial blocks); a query row with no allowed key outputs zeros (and gets zero gradients).
They run the compiled extension (csrc/block_sparse_attention: C++ on CPU, CUDA kernels on GPU)
and fall back to the pure-PyTorch reference below when the extension is not built or does not
cover the inputs (e.g. block_size 128 on CUDA), logging the reason once.
The extension is found as the installed `megadalle.ops._C`, else JIT-compiled into a cache
(see megadalle/ops/extension.py for the knobs).

On CUDA the default kernels are SIMT (fp32 multiply-adds). `use_tensor_cores(True)` (or
MEGADALLE_BSA_TENSOR_CORES=1 in the environment) switches forward and backward to the
tensor-core (WMMA) kernels of csrc/block_sparse_attention/block_sparse_attention_cuda_tc.cu.
They stay off by default until tests/test_block_sparse_cuda.py has passed with them on a GPU
(benchmarks/gpu_check.py runs those tests); the CPU path and decode are the same either way.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch

from megadalle.ops import extension
from megadalle.ops.layout import BlockLayout

log = logging.getLogger(__name__)

_ext_state: dict[str, object] = {}  # "loaded": bool, "how": str, "error": str
_logged: set[str] = set()
_tensor_cores: list[bool] = [extension.env_flag("MEGADALLE_BSA_TENSOR_CORES")]


def use_tensor_cores(enabled: bool) -> None:
    """Run the tensor-core CUDA kernels (True) or the default SIMT ones (False) from now on.

    Off by default: see the module docstring. Takes effect for calls made after it (a backward
    uses what its forward used)."""
    _tensor_cores[0] = bool(enabled)


def tensor_cores_enabled() -> bool:
    return _tensor_cores[0]


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


def _register_fakes() -> None:
    """Meta/fake implementations: shapes only, so torch.compile and FakeTensor tracing work."""

    @torch.library.register_fake("megadalle::bsa_forward")
    def _fwd_fake(q, k, v, row_ptr, col_idx, partial_idx, block_masks, block_size, scale, tensor_cores=False):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("megadalle::bsa_backward")
    def _bwd_fake(dout, q, k, v, out, lse, row_ptr, col_idx, partial_idx, t_col_ptr, t_row_idx,
                  t_partial_idx, block_masks, block_size, scale, tensor_cores=False):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    @torch.library.register_fake("megadalle::bsa_decode")
    def _dec_fake(q, k_cache, v_cache, row_ptr, col_idx, partial_idx, block_masks, block_size, pos, scale):
        return torch.empty_like(q)


def load_extension() -> bool:
    """Load the compiled ops once (installed build, else JIT); False when neither is possible."""
    if "loaded" in _ext_state:
        return bool(_ext_state["loaded"])
    jit = extension.env_flag("MEGADALLE_JIT")
    # A build that skipped the extension on purpose should not compile it behind the user's back.
    no_jit = os.environ.get("MEGADALLE_JIT", "").strip() == "0" or extension.env_flag("MEGADALLE_SKIP_EXT")
    spec = importlib.util.find_spec(extension.EXTENSION_NAME)
    try:
        if spec is not None and spec.origin and not jit:
            torch.ops.load_library(spec.origin)
            _ext_state["how"] = f"installed ({spec.origin})"
        elif no_jit:
            raise RuntimeError(f"{extension.EXTENSION_NAME} is not installed and MEGADALLE_JIT=0 or "
                               "MEGADALLE_SKIP_EXT=1 forbids building it")
        else:
            log.info("block-sparse attention: compiling the extension (first use; cached in %s)",
                     extension.jit_cache_dir())
            _ext_state["how"] = f"JIT ({extension.jit_build()})"
        _register_fakes()
        _ext_state["loaded"] = True
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the reference
        _ext_state["loaded"] = False
        _ext_state["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return bool(_ext_state["loaded"])


def extension_info() -> str:
    load_extension()
    return str(_ext_state.get("how") or f"not available ({_ext_state.get('error')})")


def _cuda_kernel_covers(q: torch.Tensor, layout: BlockLayout) -> str:
    """'' when the compiled op handles these inputs, else the reason it does not."""
    if not load_extension():
        return f"the block-sparse extension is not available ({_ext_state['error']})"
    if q.is_cuda:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("megadalle::bsa_forward", "CUDA"):
            return "the block-sparse extension was built without CUDA (rebuild on a CUDA machine)"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the CUDA kernel takes float16/bfloat16, not {q.dtype}"
        if layout.block_size not in (16, 32, 64) or q.shape[-1] not in (32, 64):
            return (f"the CUDA kernel supports block_size 16/32/64 and head_dim 32/64, "
                    f"got {layout.block_size}/{q.shape[-1]}")
    elif q.device.type != "cpu":
        return f"no kernel for device {q.device}"
    return ""


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a megadalle.ops.layout.BlockLayout, got {type(layout).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, S, D], got shape {tuple(q.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)} "
                         "in batch, heads and head_dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


@torch.compiler.disable
def _prepare_layout(layout: BlockLayout, device: torch.device, what: str) -> None:
    layout.validate_once()
    layout.arrays(device) if what == "arrays" else layout.dense_mask(device)


def _layout_on(layout: BlockLayout, device: torch.device, what: str):
    """layout.arrays(device) or layout.dense_mask(device), validated, with the work kept out of
    torch.compile graphs: once a layout has been used on a device this is a cache lookup that
    dynamo traces; before, it is a graph break (so under fullgraph=True use the layout once
    eagerly, or call prepare_layout, before compiling)."""
    cache = getattr(layout, "_derived", None)
    key = (what, device.type, device.index)
    if cache is None or not cache.get("valid") or key not in cache:
        _prepare_layout(layout, device, what)
        cache = getattr(layout, "_derived")
    return cache[key]


def prepare_layout(layout: BlockLayout, device: torch.device | str) -> None:
    """Validate `layout` and copy its arrays to `device` now (e.g. before torch.compile)."""
    for what in ("arrays", "dense"):
        _layout_on(layout, torch.device(device), what)


def _default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# Reference (also the fallback)
# ----------------------------------------------------------------------------------------------


def _masked_softmax_attention(q, k, v, mask, scale, upcast):
    """softmax(scale q k^T masked) v with rows that allow nothing set to 0 (finite gradients)."""
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale  # (B, H, Sq, Sk)
    empty = ~mask.any(-1, keepdim=True)
    # Empty rows keep finite scores so softmax has no NaN; their weights are zeroed after.
    probs = torch.softmax(scores.masked_fill(~mask & ~empty, float("-inf")), dim=-1).masked_fill(~mask, 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v).to(dtype)


def block_sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                                     scale: float | None = None, upcast: bool = True) -> torch.Tensor:
    """Dense attention under the layout's element mask. upcast=False computes in q's dtype
    (used by tests to measure PyTorch's own low-precision error)."""
    _check_inputs(q, k, v, layout)
    if q.shape[2] != layout.seq_len or k.shape[2] != layout.seq_len:
        raise ValueError(f"sequence length {q.shape[2]} does not match layout.seq_len={layout.seq_len}")
    return _masked_softmax_attention(q, k, v, _layout_on(layout, q.device, "dense"), _default_scale(q, scale),
                                     upcast)


def block_sparse_attention_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                            layout: BlockLayout, pos: int, scale: float | None = None) -> torch.Tensor:
    _check_decode(q, k_cache, v_cache, layout, pos)
    mask = _layout_on(layout, q.device, "dense")[pos:pos + 1, :pos + 1]  # (1, pos + 1)
    return _masked_softmax_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1], mask,
                                     _default_scale(q, scale), upcast=True)


# ----------------------------------------------------------------------------------------------
# Compiled op
# ----------------------------------------------------------------------------------------------


class _BlockSparseAttentionFn(torch.autograd.Function):
    """Forward saves only (out, lse); backward recomputes the probabilities from lse."""

    @staticmethod
    def forward(ctx, q, k, v, row_ptr, col_idx, partial_idx, block_masks, t_col_ptr, t_row_idx, t_partial_idx,
                block_size: int, scale: float, tensor_cores: bool = False):
        # The flag is passed only when set (CUDA): an extension built before it existed still
        # runs the default path.
        extra = (True,) if tensor_cores else ()
        out, lse = torch.ops.megadalle.bsa_forward(q, k, v, row_ptr, col_idx, partial_idx, block_masks,
                                                   block_size, scale, *extra)
        ctx.save_for_backward(q, k, v, out, lse, row_ptr, col_idx, partial_idx, block_masks,
                              t_col_ptr, t_row_idx, t_partial_idx)
        ctx.block_size, ctx.scale, ctx.extra = block_size, scale, extra
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, row_ptr, col_idx, partial_idx, block_masks, t_col_ptr, t_row_idx, t_partial_idx = \
            ctx.saved_tensors
        dq, dk, dv = torch.ops.megadalle.bsa_backward(
            dout.contiguous(), q, k, v, out, lse, row_ptr, col_idx, partial_idx, t_col_ptr, t_row_idx,
            t_partial_idx, block_masks, ctx.block_size, ctx.scale, *ctx.extra)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout,
                           scale: float | None = None) -> torch.Tensor:
    """Attention of q [B, H, S, D] over the keys `layout` allows; see the module docstring."""
    _check_inputs(q, k, v, layout)
    if q.shape[2] != layout.seq_len or k.shape[2] != layout.seq_len:
        raise ValueError(f"sequence length {q.shape[2]} does not match layout.seq_len={layout.seq_len}; "
                         "build the layout for this length")
    scale = _default_scale(q, scale)
    reason = _cuda_kernel_covers(q, layout)
    if reason:
        _log_once(f"block_sparse_attention: using the PyTorch reference because {reason}")
        return block_sparse_attention_reference(q, k, v, layout, scale)
    a = _layout_on(layout, q.device, "arrays")
    return _BlockSparseAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), a.row_ptr, a.col_idx,
                                         a.partial_idx, a.block_masks, a.t_col_ptr, a.t_row_idx, a.t_partial_idx,
                                         layout.block_size, scale, q.is_cuda and _tensor_cores[0])


def _check_decode(q, k_cache, v_cache, layout, pos) -> None:
    _check_inputs(q, k_cache, v_cache, layout)
    if q.shape[2] != 1:
        raise ValueError(f"decode takes one new token: q must be [B, H, 1, D], got {tuple(q.shape)}")
    if not 0 <= pos < min(k_cache.shape[2], layout.seq_len):
        raise ValueError(f"pos={pos} must be in [0, {min(k_cache.shape[2], layout.seq_len)}): below both the "
                         f"cache length {k_cache.shape[2]} and layout.seq_len {layout.seq_len}")


def block_sparse_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  layout: BlockLayout, pos: int, scale: float | None = None) -> torch.Tensor:
    """Attention of the token at `pos` (q [B, H, 1, D]) over cache keys 0..pos the layout allows.

    Inference only (no autograd). The cache must be contiguous [B, H, cache_len, D]."""
    _check_decode(q, k_cache, v_cache, layout, pos)
    scale = _default_scale(q, scale)
    reason = _cuda_kernel_covers(q, layout)
    if reason:
        _log_once(f"block_sparse_attention_decode: using the PyTorch reference because {reason}")
        return block_sparse_attention_decode_reference(q, k_cache, v_cache, layout, pos, scale)
    a = _layout_on(layout, q.device, "arrays")
    return torch.ops.megadalle.bsa_decode(q.contiguous(), k_cache, v_cache, a.row_ptr, a.col_idx, a.partial_idx,
                                          a.block_masks, layout.block_size, int(pos), scale)
