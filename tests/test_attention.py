"""Attention backends agree with an fp64 reference built from the element-level masks."""

import sys

import pytest
import torch

from megadalle.config import ATTENTION_TYPES, ConfigError, load_config
from megadalle.transformer.attention import attention, block_sparse_available
from megadalle.transformer.masks import MaskGeometry, element_mask, mask_set
from megadalle.transformer.model import DALLETransformer

G = MaskGeometry(text_len=32, grid=8, row_window=9, conv_kernel=5)  # the tiny preset's stream: 96
CUDA = torch.cuda.is_available()


def _reference(q, k, v, g, kind, length):
    """Plain softmax attention in fp64 with the raster-order element mask (no permutation)."""
    m = element_mask(g, kind)[:length, :length].to(q.device)
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (s.masked_fill(~m, float("-inf")).softmax(-1) @ v.double())


def _qkv(length, device="cpu", dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, length, 16, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def _check_against_reference(backend, kind, length, device="cpu", dtype=torch.float32, grad=True, **kw):
    q, k, v = _qkv(length, device, dtype, grad=grad)
    ms = mask_set(G, kind, length)
    out = attention(q, k, v, ms, backend, **kw)
    ref = _reference(q, k, v, G, kind, length)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    if grad:
        dout = torch.randn_like(ref)
        g_out = torch.autograd.grad(out.double(), (q, k, v), dout)
        g_ref = torch.autograd.grad(ref, (q, k, v), dout)
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a.double(), b.double(), atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
@pytest.mark.parametrize("length", [G.seq_len, 61])
def test_dense_matches_reference(kind, length):
    _check_against_reference("dense", kind, length)


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_flex_forward_matches_reference(kind, block_size):
    # 96 positions are not a multiple of 32: the partial last block is exercised too.
    _check_against_reference("flex", kind, G.seq_len, grad=False, block_size=block_size, compile_flex=False)


def test_flex_backward_on_cpu_is_a_clear_error():
    q, k, v = _qkv(G.seq_len)
    with pytest.raises(ConfigError, match="backend=dense"):
        attention(q, k, v, mask_set(G, "row", G.seq_len), "flex", compile_flex=False)


@pytest.mark.skipif(not CUDA, reason="FlexAttention's backward needs a GPU in this torch")
@pytest.mark.parametrize("kind", ATTENTION_TYPES)
def test_flex_gradients_match_reference_on_gpu(kind):
    _check_against_reference("flex", kind, G.seq_len, device="cuda", compile_flex=True)


@pytest.mark.slow
def test_compiled_flex_matches_reference():
    """torch.compile(flex_attention) on this machine (about 20 s to compile on CPU, forward only)."""
    _check_against_reference("flex", "column", G.seq_len, device="cuda" if CUDA else "cpu", grad=CUDA,
                             block_size=32, compile_flex=True)


@pytest.mark.parametrize("kind", ATTENTION_TYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_blocksparse_matches_reference(kind, block_size):
    assert block_sparse_available(), "megadalle.ops.block_sparse_attention is missing"
    _check_against_reference("blocksparse", kind, G.seq_len, block_size=block_size)


def test_blocksparse_missing_is_a_clear_error(monkeypatch):
    # The kernel is part of this checkout: hide its module to reach the error a checkout without it gives.
    monkeypatch.setitem(sys.modules, "megadalle.ops.block_sparse_attention", None)
    assert not block_sparse_available()
    q, k, v = _qkv(G.seq_len)
    with pytest.raises(ConfigError, match="block_sparse_attention.*use transformer.backend=dense or flex"):
        attention(q, k, v, mask_set(G, "row", G.seq_len), "blocksparse")


def test_unknown_backend_and_bad_shapes():
    q, k, v = _qkv(G.seq_len, grad=False)
    ms = mask_set(G, "row", G.seq_len)
    with pytest.raises(ConfigError, match="choose one of"):
        attention(q, k, v, ms, "magic")
    with pytest.raises(ValueError, match="does not match"):
        attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], ms)
    with pytest.raises(ValueError, match="batch, heads, seq, head_dim"):
        attention(q[0], k[0], v[0], ms)


def test_model_logits_agree_between_dense_and_flex():
    base = {"transformer.depth": 4, "transformer.dim": 32, "transformer.heads": 2, "transformer.head_dim": 16,
            "transformer.attention_schedule": "row,column,conv,full", "transformer.compile_flex": False}
    dense = DALLETransformer(load_config("tiny", overrides=base).transformer)
    flex = DALLETransformer(load_config("tiny", overrides={**base, "transformer.backend": "flex"}).transformer)
    flex.load_state_dict(dense.state_dict())
    cfg = dense.cfg
    text = torch.randint(0, cfg.text_vocab_size, (2, cfg.text_len))
    codes = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    with torch.no_grad():
        for a, b in zip(dense(text, codes), flex(text, codes)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
