"""Block-sparse attention on CUDA: the same comparisons as the CPU tests, for the CUDA kernels.

Skipped without a CUDA device. On a CUDA machine the extension must have been built with CUDA
(`pip install --no-build-isolation -e .` there, or the JIT path): a missing CUDA kernel fails
here instead of silently testing the reference fallback.

The comparisons run for both CUDA paths: the default SIMT kernels (ids `simt`) and the
tensor-core kernels that are off by default (ids `tensorcores`; block_sparse_attention.
use_tensor_cores). `pytest -k "not tensorcores"` runs the default path alone, `-k tensorcores`
the tensor-core one (benchmarks/gpu_check.py runs them in two processes, so that a crash of one
path cannot take the other's results with it).
"""

from __future__ import annotations

import pytest
import torch

from megadalle.ops import block_sparse_attention as bsa
from megadalle.ops.block_sparse_attention import (block_sparse_attention, block_sparse_attention_decode,
                                                  block_sparse_attention_reference)
from megadalle.ops.layout import BlockLayout
from megadalle.transformer.masks import MaskGeometry, mask_set

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KINDS = ("row", "column", "conv")
SMALL = MaskGeometry(text_len=5, grid=6, row_window=7, conv_kernel=3)  # 41 positions, odd
PAPER = MaskGeometry(text_len=256, grid=32, row_window=33, conv_kernel=11)  # 1280 positions


@pytest.fixture(scope="module", autouse=True)
def cuda_kernel_built():
    assert bsa.load_extension(), f"block-sparse extension unavailable: {bsa.extension_info()}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("megadalle::bsa_forward", "CUDA"), (
        f"the extension ({bsa.extension_info()}) has no CUDA kernel: rebuild it on this machine")


@pytest.fixture(params=["simt", "tensorcores"])
def kernel(request):
    """Which CUDA kernels block_sparse_attention runs for the test (restored after it)."""
    before = bsa.tensor_cores_enabled()
    bsa.use_tensor_cores(request.param == "tensorcores")
    yield request.param
    bsa.use_tensor_cores(before)


def compare(layout: BlockLayout, dtype: torch.dtype, b: int, h: int, d: int, seed: int = 0):
    """Kernel and PyTorch-in-dtype errors against an fp32 reference, for out, dq, dk, dv."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(b, h, layout.seq_len, d, generator=gen) for _ in range(4)]
    q, k, v = (t.cuda().to(dtype).requires_grad_() for t in base[:3])
    dout = base[3].cuda().to(dtype)

    def run(fn, q, k, v, dout):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    got = run(lambda *a: block_sparse_attention(*a, layout), q, k, v, dout)
    exact = run(lambda *a: block_sparse_attention_reference(*a, layout),
                *(t.detach().float().requires_grad_() for t in (q, k, v)), dout.float())
    torch_lp = run(lambda *a: block_sparse_attention_reference(*a, layout, upcast=False), q, k, v, dout)
    for name, a, ref, lp in zip(("out", "dq", "dk", "dv"), got, exact, torch_lp):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err = (a.float() - ref).abs().max().item()
        torch_err = (lp.float() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-3, f"{name}: kernel error {err:.3g}, PyTorch {dtype} error {torch_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size,head_dim", [(16, 32), (32, 64), (64, 64)])
def test_small_odd_stream_matches_reference(kernel, kind, dtype, block_size, head_dim):
    compare(mask_set(SMALL, kind, SMALL.seq_len).layout(block_size), dtype, b=2, h=3, d=head_dim)


@pytest.mark.parametrize("kind", KINDS)
def test_paper_stream_bf16(kernel, kind):
    compare(mask_set(PAPER, kind, PAPER.seq_len).layout(64), torch.bfloat16, b=2, h=2, d=64, seed=1)


def test_rows_without_allowed_keys_give_zeros(kernel):
    mask = torch.tril(torch.ones(70, 70, dtype=torch.bool))
    mask[[0, 33, 69]] = False
    layout = BlockLayout.from_dense_mask(mask, 32)
    q, k, v = (torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout)
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert (out[:, :, [0, 33, 69]] == 0).all() and (dq[:, :, [0, 33, 69]] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["simt", "tensorcores"])
def test_the_kernels_asked_for_are_the_ones_that_run(tensor_cores):
    """use_tensor_cores switches forward and backward to the *_tc_kernel launches, and only then
    (the profiler lists the CUDA kernels that ran)."""
    layout = mask_set(PAPER, "conv", PAPER.seq_len).layout(64)
    q, k, v = (torch.randn(1, 2, PAPER.seq_len, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    before = bsa.tensor_cores_enabled()
    bsa.use_tensor_cores(tensor_cores)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            block_sparse_attention(q, k, v, layout).float().sum().backward()
            torch.cuda.synchronize()
    finally:
        bsa.use_tensor_cores(before)
    names = " ".join(e.name for e in prof.events())
    for kernel in ("forward", "dq", "dkdv"):
        assert (f"{kernel}_tc_kernel" in names) == tensor_cores, f"{kernel}: kernels that ran: {names[:2000]}"
        assert (f"{kernel}_kernel" in names) == (not tensor_cores), f"{kernel}: kernels that ran: {names[:2000]}"


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_forward_row(kind):
    layout = BlockLayout.from_dense_mask(mask_set(PAPER, kind, PAPER.seq_len).raster, 64)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, PAPER.seq_len, 64, generator=g).cuda().bfloat16() for _ in range(3))
    full = block_sparse_attention(q, k, v, layout)
    k_cache = torch.full((2, 2, PAPER.seq_len + 7, 64), float("nan"), device="cuda", dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    for pos in (0, 255, 256, 257, 700, PAPER.seq_len - 1):
        k_cache[:, :, :pos + 1] = k[:, :, :pos + 1]
        v_cache[:, :, :pos + 1] = v[:, :, :pos + 1]
        got = block_sparse_attention_decode(q[:, :, pos:pos + 1], k_cache, v_cache, layout, pos)
        torch.testing.assert_close(got.float(), full[:, :, pos:pos + 1].float(), atol=2e-2, rtol=2e-2)


def test_layout_and_inputs_on_different_devices_are_handled():
    """The Python API copies the layout to q's device; the raw op names a device mismatch."""
    layout = mask_set(SMALL, "row", SMALL.seq_len).layout(16)
    q = torch.randn(1, 1, SMALL.seq_len, 32, device="cuda", dtype=torch.float16)
    block_sparse_attention(q, q, q, layout)  # CPU layout, CUDA tensors: copied once
    a = layout.arrays("cpu")
    with pytest.raises(RuntimeError, match="move all inputs"):
        torch.ops.megadalle.bsa_forward(q, q, q, a.row_ptr, a.col_idx, a.partial_idx, a.block_masks, 16, 0.1)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        b = layout.arrays("cuda")
        torch.ops.megadalle.bsa_forward(q.float(), q.float(), q.float(), b.row_ptr, b.col_idx, b.partial_idx,
                                        b.block_masks, 16, 0.1)


def test_unsupported_cuda_sizes_fall_back_to_reference():
    layout = mask_set(SMALL, "conv", SMALL.seq_len).layout(128)  # block 128: no CUDA instantiation
    q = torch.randn(1, 2, SMALL.seq_len, 64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(block_sparse_attention(q, q, q, layout),
                               block_sparse_attention_reference(q, q, q, layout))
