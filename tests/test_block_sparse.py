"""Block-sparse attention on the CPU: the C++ op against the PyTorch reference.

The reference (dense attention under the layout's element mask) is itself checked against the
transformer's element-level masks (megadalle.transformer.masks), so the chain is
element rules -> dense mask -> block layout -> kernel. Shapes are small and odd on purpose:
S not a multiple of the block size, partial blocks, batch and heads > 1.
"""

from __future__ import annotations

import logging

import pytest
import torch

from megadalle.ops import block_sparse_attention as bsa
from megadalle.ops.block_sparse_attention import (block_sparse_attention, block_sparse_attention_decode,
                                                  block_sparse_attention_decode_reference,
                                                  block_sparse_attention_reference)
from megadalle.ops.layout import BlockLayout
from megadalle.transformer.masks import MaskGeometry, allowed, mask_set

# 5 text + 6x6 image = 41 positions: 3 blocks of 16, the last one padded.
GEOMETRY = MaskGeometry(text_len=5, grid=6, row_window=7, conv_kernel=3)
KINDS = ("row", "column", "conv")


@pytest.fixture(scope="module", autouse=True)
def compiled_extension():
    """Every test here is about the compiled op: fail (not skip) when it cannot be built."""
    assert bsa.load_extension(), f"block-sparse extension unavailable: {bsa.extension_info()}"


def dalle_layout(kind: str, block_size: int = 16, g: MaskGeometry = GEOMETRY) -> BlockLayout:
    """The layout the attention backend uses (column layers in transposed-grid order)."""
    return mask_set(g, kind, g.seq_len).layout(block_size)


def qkv(layout: BlockLayout, b: int = 2, h: int = 3, d: int = 16, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, layout.seq_len, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def run_with_grads(fn, q, k, v, layout, dout):
    out = fn(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out, *grads)


def test_reference_follows_element_rules():
    """The dense mask behind the reference is the element-level definition, pair by pair."""
    for kind in KINDS:
        ms = mask_set(GEOMETRY, kind, GEOMETRY.seq_len)
        mask = ms.layout(16).to_dense_mask()
        perm = ms.perm if ms.perm is not None else torch.arange(GEOMETRY.seq_len)
        for a in range(GEOMETRY.seq_len):
            for b in range(GEOMETRY.seq_len):
                assert bool(mask[a, b]) == allowed(GEOMETRY, kind, int(perm[a]), int(perm[b])), (kind, a, b)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size,head_dim", [(16, 16), (32, 8), (64, 64)])
def test_fp32_matches_reference(kind, block_size, head_dim):
    layout = dalle_layout(kind, block_size)
    q, k, v = qkv(layout, d=head_dim)
    dout = torch.randn_like(q)
    got = run_with_grads(block_sparse_attention, q, k, v, layout, dout)
    want = run_with_grads(block_sparse_attention_reference, q, k, v, layout, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{kind} {name}: {m}")


def test_paper_block_size_and_head_dim_on_a_larger_stream():
    """64-blocks and head dim 64 over 16 text + 16x16 image tokens (272 = 4.25 blocks)."""
    g = MaskGeometry(text_len=16, grid=16, row_window=17, conv_kernel=11)
    for kind in KINDS:
        layout = dalle_layout(kind, 64, g)
        q, k, v = qkv(layout, b=1, h=2, d=64, seed=1)
        dout = torch.randn_like(q)
        got = run_with_grads(block_sparse_attention, q, k, v, layout, dout)
        want = run_with_grads(block_sparse_attention_reference, q, k, v, layout, dout)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_error_at_most_pytorchs_own(kind, dtype):
    """Error vs the fp32 reference at most twice that of PyTorch's own attention in `dtype` (as the
    README says; measured at most 1.13x)."""
    layout = dalle_layout(kind)
    q, k, v = qkv(layout, dtype=dtype, seed=2)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = run_with_grads(block_sparse_attention, q, k, v, layout, dout)
    exact = run_with_grads(block_sparse_attention_reference, *(t.detach().double().requires_grad_() for t in (q, k, v)),
                           layout, dout.double())
    torch_lp = run_with_grads(lambda *a: block_sparse_attention_reference(*a, upcast=False), q, k, v, layout, dout)
    for name, a, ref, base in zip(("out", "dq", "dk", "dv"), got, exact, torch_lp):
        assert a.dtype == dtype
        err = (a.double() - ref).abs().max().item()
        torch_err = (base.double() - ref).abs().max().item()
        assert err <= 2 * torch_err, f"{kind} {dtype} {name}: kernel error {err:.3g} vs PyTorch {torch_err:.3g}"


def test_gradcheck_fp64_through_the_cpp_op():
    """gradcheck runs the C++ op itself (it supports float64), not the reference."""
    mask = torch.tril(torch.rand(10, 10, generator=torch.Generator().manual_seed(4)) < 0.6)
    mask[0, 0] = mask[6, 6] = True
    mask[4] = False  # one row with nothing to attend to
    layout = BlockLayout.from_dense_mask(mask, 4)
    q, k, v = (t.detach().double().requires_grad_() for t in qkv(layout, b=1, h=2, d=3, seed=5))
    assert torch.autograd.gradcheck(lambda *a: block_sparse_attention(*a, layout, 0.7), (q, k, v))


def test_rows_without_allowed_keys_give_zeros_and_zero_grads():
    mask = torch.tril(torch.ones(20, 20, dtype=torch.bool))
    mask[0] = False
    mask[9] = False
    mask[17, :] = False
    layout = BlockLayout.from_dense_mask(mask, 8)
    q, k, v = qkv(layout, seed=6)
    out = block_sparse_attention(q, k, v, layout)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    empty = torch.tensor([0, 9, 17])
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))
    ref = block_sparse_attention_reference(q, k, v, layout)
    torch.testing.assert_close(out, ref)
    for got, want in zip((dq, dk, dv), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(got, want)
    # A layout with no kept block at all.
    none = BlockLayout.from_dense_mask(torch.zeros(20, 20, dtype=torch.bool), 8)
    assert none.nnz == 0
    assert torch.equal(block_sparse_attention(q, k, v, none), torch.zeros_like(q))


def raster_layout(kind: str, block_size: int = 16, g: MaskGeometry = GEOMETRY) -> BlockLayout:
    """The layout in raster order: what KV-cached decoding uses (the cache is filled in raster order)."""
    return BlockLayout.from_dense_mask(mask_set(g, kind, g.seq_len).raster, block_size)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_matches_the_full_forward_row(kind):
    layout = raster_layout(kind)
    S, D = layout.seq_len, 16
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, S, D, generator=g) for _ in range(3))
    full = block_sparse_attention(q, k, v, layout)
    cache_len = S + 5  # a preallocated cache longer than the stream; garbage past pos is never read
    k_cache = torch.full((2, 3, cache_len, D), float("nan"))
    v_cache = torch.full((2, 3, cache_len, D), float("nan"))
    for pos in (0, 4, 5, 16, 17, 31, S - 1):
        # Positions after pos are not written yet: NaN there would poison any read.
        k_cache[:, :, :pos + 1] = k[:, :, :pos + 1]
        v_cache[:, :, :pos + 1] = v[:, :, :pos + 1]
        got = block_sparse_attention_decode(q[:, :, pos:pos + 1], k_cache, v_cache, layout, pos)
        torch.testing.assert_close(got, full[:, :, pos:pos + 1], atol=1e-5, rtol=1e-5, msg=f"pos {pos}")
        ref = block_sparse_attention_decode_reference(q[:, :, pos:pos + 1], k_cache, v_cache, layout, pos)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_decode_bf16_close_to_fp32():
    layout = raster_layout("column")
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 1, 32, generator=g)
    kc, vc = (torch.randn(1, 2, layout.seq_len, 32, generator=g) for _ in range(2))
    pos = layout.seq_len - 1
    want = block_sparse_attention_decode(q, kc, vc, layout, pos)
    got = block_sparse_attention_decode(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), layout, pos)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------------------------- bad input


def test_python_level_errors_are_clear():
    layout = dalle_layout("row")
    q, k, v = (t.detach() for t in qkv(layout))
    with pytest.raises(ValueError, match="does not match layout.seq_len=41"):
        block_sparse_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], layout)
    with pytest.raises(ValueError, match="share one dtype"):
        block_sparse_attention(q, k.double(), v, layout)
    with pytest.raises(ValueError, match=r"q must be \[B, H, S, D\]"):
        block_sparse_attention(q[0], k[0], v[0], layout)
    with pytest.raises(ValueError, match="must match q"):
        block_sparse_attention(q, k[:, :2], v[:, :2], layout)
    with pytest.raises(TypeError, match="BlockLayout"):
        block_sparse_attention(q, k, v, layout.to_dense_mask())
    with pytest.raises(ValueError, match=r"pos=41 must be in \[0, 41\)"):
        block_sparse_attention_decode(q[:, :, :1], k, v, layout, 41)
    with pytest.raises(ValueError, match="one new token"):
        block_sparse_attention_decode(q[:, :, :2], k, v, layout, 3)


def test_invalid_layouts_are_rejected_before_any_kernel_runs():
    good = dalle_layout("row")
    q, k, v = (t.detach() for t in qkv(good))

    def broken(**changes) -> BlockLayout:
        fields = dict(seq_len=good.seq_len, block_size=good.block_size, row_ptr=good.row_ptr,
                      col_idx=good.col_idx, partial_idx=good.partial_idx, block_masks=good.block_masks)
        return BlockLayout(**{**fields, **changes})

    cases = {
        "row_ptr must start at 0": broken(row_ptr=good.row_ptr + 1),
        "col_idx values must be in": broken(col_idx=good.col_idx.clone().fill_(7)),
        "must be a 1-D int32 tensor": broken(col_idx=good.col_idx.long()),
        "strictly ascending": broken(col_idx=good.col_idx.flip(0)),
        "partial_idx values must be -1 or in": broken(partial_idx=good.partial_idx.clone().fill_(99)),
        "block_masks must be bool": broken(block_masks=good.block_masks.float()),
    }
    for message, layout in cases.items():
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(q, k, v, layout)


def test_op_level_checks_name_the_problem():
    """Direct calls of the registered op (what torch.compile graphs contain) check their inputs too."""
    layout = dalle_layout("row")
    a = layout.arrays()
    q, k, v = (t.detach() for t in qkv(layout))
    op = torch.ops.megadalle.bsa_forward
    args = (a.row_ptr, a.col_idx, a.partial_idx, a.block_masks, 16, 0.25)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(q.transpose(2, 3), k, v, *args)
    with pytest.raises(RuntimeError, match="must be int32"):
        op(q, k, v, a.row_ptr.long(), *args[1:])
    with pytest.raises(RuntimeError, match="has 3 query blocks but a sequence of 60 tokens"):
        z = torch.zeros(2, 3, 60, 16)
        op(z, z, z, *args)
    with pytest.raises(RuntimeError, match="is not supported"):
        z = torch.zeros(2, 3, 41, 16, dtype=torch.int32)
        op(z, z, z, *args)
    with pytest.raises(RuntimeError, match="block_masks must be"):
        op(q, k, v, *args[:3], a.block_masks[:, :8], 16, 0.25)


# ------------------------------------------------------------------------- registration & fallback


def test_fake_impls_pass_opcheck():
    layout = dalle_layout("conv")
    a = layout.arrays()
    q, k, v = (t.detach() for t in qkv(layout, b=1, h=1, d=8))
    out, lse = torch.ops.megadalle.bsa_forward(q, k, v, a.row_ptr, a.col_idx, a.partial_idx, a.block_masks, 16, 0.3)
    lay = (a.row_ptr, a.col_idx, a.partial_idx)
    torch.library.opcheck(torch.ops.megadalle.bsa_forward, (q, k, v, *lay, a.block_masks, 16, 0.3))
    torch.library.opcheck(torch.ops.megadalle.bsa_backward,
                          (torch.randn_like(q), q, k, v, out, lse, *lay, a.t_col_ptr, a.t_row_idx, a.t_partial_idx,
                           a.block_masks, 16, 0.3))
    torch.library.opcheck(torch.ops.megadalle.bsa_decode,
                          (q[:, :, :1], k, v, *lay, a.block_masks, 16, 20, 0.3))


def test_torch_compile_traces_forward_and_backward():
    """fullgraph once the layout is prepared; a cold layout only costs a graph break."""
    for fullgraph in (False, True):
        layout = BlockLayout.from_dense_mask(mask_set(GEOMETRY, "row", GEOMETRY.seq_len).mask, 16)  # cold
        if fullgraph:
            bsa.prepare_layout(layout, "cpu")
        q, k, v = qkv(layout, b=1, h=2, d=8)
        compiled = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout) * 2, backend="aot_eager",
                                 fullgraph=fullgraph)
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = block_sparse_attention(q, k, v, layout) * 2
        torch.testing.assert_close(out, want)
        for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(g, w)


def test_missing_extension_falls_back_to_reference_and_logs_once(monkeypatch, caplog):
    layout = dalle_layout("column")
    q, k, v = qkv(layout)
    monkeypatch.setattr(bsa, "_ext_state", {"loaded": False, "error": "ImportError: simulated"})
    monkeypatch.setattr(bsa, "_logged", set())
    with caplog.at_level(logging.WARNING, logger=bsa.__name__):
        out = block_sparse_attention(q, k, v, layout)
        block_sparse_attention(q, k, v, layout)
        dec = block_sparse_attention_decode(q[:, :, 3:4], k, v, layout, 3)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("using the PyTorch reference" in m and "simulated" in m for m in messages) == 2, messages  # fwd + decode
    torch.testing.assert_close(out, block_sparse_attention_reference(q, k, v, layout))
    torch.testing.assert_close(dec, block_sparse_attention_decode_reference(q[:, :, 3:4], k, v, layout, 3))
    out.sum().backward()  # the fallback is differentiable too
    want = torch.autograd.grad(block_sparse_attention_reference(q, k, v, layout).sum(), q)[0]
    torch.testing.assert_close(q.grad, want)


@pytest.mark.parametrize("knob", ["MEGADALLE_JIT=0", "MEGADALLE_SKIP_EXT=1"])
def test_no_installed_extension_and_no_jit_means_reference(monkeypatch, caplog, knob):
    name, value = knob.split("=")
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(bsa.extension, "EXTENSION_NAME", "megadalle.ops._not_built")
    monkeypatch.setattr(bsa, "_ext_state", {})
    monkeypatch.setattr(bsa, "_logged", set())
    layout = dalle_layout("row")
    q, k, v = qkv(layout)
    with caplog.at_level(logging.WARNING, logger=bsa.__name__):
        out = block_sparse_attention(q, k, v, layout)
    assert not bsa.load_extension() and "not available" in bsa.extension_info()
    assert any("megadalle.ops._not_built is not installed" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, block_sparse_attention_reference(q, k, v, layout))


def test_transposed_layout_lists_the_same_blocks():
    for kind in KINDS:
        layout = dalle_layout(kind)
        col_ptr, row_idx, t_pidx = layout.transposed()
        by_row = {(i, int(layout.col_idx[e]), int(layout.partial_idx[e]))
                  for i in range(layout.n_blocks) for e in range(int(layout.row_ptr[i]), int(layout.row_ptr[i + 1]))}
        by_col = set()
        for j in range(layout.n_blocks):
            rows = row_idx[int(col_ptr[j]):int(col_ptr[j + 1])]
            assert bool((rows[1:] > rows[:-1]).all())
            by_col |= {(int(row_idx[e]), j, int(t_pidx[e])) for e in range(int(col_ptr[j]), int(col_ptr[j + 1]))}
        assert by_row == by_col
        assert layout.arrays("cpu") is layout.arrays("cpu")  # copied once per device


@pytest.mark.parametrize("kind", KINDS)
def test_transformer_blocksparse_backend_matches_dense(kind):
    """Through the transformer's attention(): permutation for column layers, then our op."""
    from megadalle.transformer.attention import attention

    ms = mask_set(GEOMETRY, kind, GEOMETRY.seq_len)
    q, k, v = qkv(ms.layout(16), seed=9)
    got = attention(q, k, v, ms, "blocksparse", block_size=16)
    want = attention(q, k, v, ms, "dense")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_threads_split_work_without_changing_results():
    """at::parallel_for chunks (batch*head, query block) tasks; results must not depend on it."""
    layout = dalle_layout("conv")
    q, k, v = qkv(layout, seed=10)
    dout = torch.randn_like(q)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(block_sparse_attention, q, k, v, layout, dout)
        torch.set_num_threads(2)
        two = run_with_grads(block_sparse_attention, q, k, v, layout, dout)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
