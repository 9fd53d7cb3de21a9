"""The stage-2 model: stream layout, embeddings, loss weighting, the resblock interface."""

import math

import pytest
import torch

from megadalle.config import load_config
from megadalle.transformer.model import DALLETransformer, default_resblock_runner


def _cfg(**overrides):
    base = {"transformer.depth": 4, "transformer.dim": 32, "transformer.heads": 2, "transformer.head_dim": 16}
    base.update(overrides)
    return load_config("tiny", overrides=base).transformer


def _batch(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab_size, (B, cfg.text_len), generator=g)
    text[0, 10:] = 0
    text[1, 20:] = 0
    codes = torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g)
    return text, codes


def test_forward_shapes_and_fp32_logits():
    cfg = _cfg()
    m = DALLETransformer(cfg).to(torch.bfloat16)
    text, codes = _batch(cfg)
    tl, il = m(text, codes)
    assert tl.shape == (2, cfg.text_len, cfg.text_vocab_size) and tl.dtype == torch.float32
    assert il.shape == (2, cfg.image_len, cfg.image_vocab_size) and il.dtype == torch.float32
    # A prefix of the image is a valid input too (generation feeds growing prefixes).
    _, il5 = DALLETransformer(cfg)(text, codes[:, :5])
    assert il5.shape == (2, 5, cfg.image_vocab_size)


def test_prediction_is_causal_over_the_stream():
    """Changing image token j changes no logits for tokens <= j (it is only fed after j)."""
    torch.manual_seed(0)
    cfg = _cfg()
    m = DALLETransformer(cfg)
    text, codes = _batch(cfg)
    tl, il = m(text, codes)
    codes2 = codes.clone()
    j = 37
    codes2[:, j] = (codes2[:, j] + 1) % cfg.image_vocab_size
    tl2, il2 = m(text, codes2)
    torch.testing.assert_close(tl2, tl)
    torch.testing.assert_close(il2[:, : j + 1], il[:, : j + 1])
    assert not torch.allclose(il2[:, j + 1:], il[:, j + 1:])
    # The last text token conditions every image token, including the first.
    text2 = text.clone()
    text2[:, 5] += 1
    tl3, il3 = m(text2, codes)
    torch.testing.assert_close(tl3[:, :6], tl[:, :6])
    assert not torch.allclose(il3[:, 0], il[:, 0])


def test_each_padding_position_has_its_own_embedding():
    cfg = _cfg()
    m = DALLETransformer(cfg)
    text = torch.zeros(1, cfg.text_len, dtype=torch.long)
    text[0, :3] = torch.tensor([7, 8, 9])
    e = m.embed_text(text)  # (1, T + 1, dim): BOS then one position per text token
    assert e.shape == (1, cfg.text_len + 1, cfg.dim)
    torch.testing.assert_close(e[0, 0], m.bos)
    torch.testing.assert_close(e[0, 1 + 3], m.pad_embed[3] + m.text_pos_embed[3])
    torch.testing.assert_close(e[0, 1 + 1], m.text_embed.weight[8] + m.text_pos_embed[1])
    # Padding never reads the token table's row 0.
    with torch.no_grad():
        m.text_embed.weight[0].fill_(1e6)
    assert m.embed_text(text).abs().max() < 1e3
    # Row and column embeddings: image token 26 on the 12-wide grid is at (2, 2).
    assert cfg.image_grid == 12
    codes = torch.tensor([[3]])
    torch.testing.assert_close(m.embed_image(codes, start=26)[0, 0],
                               m.image_embed.weight[3] + m.row_embed[2] + m.col_embed[2])


def _handmade_model(cfg, text_bias_token: int, b: float):
    """Heads whose logits do not depend on the input: text logits = bias with `b` on one token,
    image logits uniform, so the expected losses follow from the targets alone."""
    m = DALLETransformer(cfg)
    with torch.no_grad():
        m.text_head.weight.zero_()
        m.text_head.bias.zero_()
        m.text_head.bias[text_bias_token] = b
        m.image_head.weight.zero_()
        m.image_head.bias.zero_()
    return m


@pytest.mark.parametrize("predict_padding", [True, False])
def test_loss_weighting_on_a_handmade_batch(predict_padding):
    w = 0.25
    cfg = _cfg(**{"transformer.text_loss_weight": w, "transformer.predict_padding": predict_padding})
    V, b = cfg.text_vocab_size, math.log(9.0)
    m = _handmade_model(cfg, text_bias_token=5, b=b)
    text = torch.zeros(2, cfg.text_len, dtype=torch.long)
    text[0, :2] = torch.tensor([5, 7])  # caption of 2 tokens, then 30 padding
    text[1, :4] = torch.tensor([5, 5, 5, 6])  # caption of 4 tokens, then 28 padding
    codes = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    z = 9.0 + (V - 1)  # softmax normaliser of the text logits
    nll_5, nll_other = -math.log(9.0 / z), -math.log(1.0 / z)
    n5, n_other_words = 4, 2  # four 5s; a 7 and a 6
    n_pad = 2 * cfg.text_len - 6
    if predict_padding:
        text_ce = (n5 * nll_5 + (n_other_words + n_pad) * nll_other) / (2 * cfg.text_len)
    else:
        # Averaged over the 6 caption tokens, not per caption (that would give a different value).
        text_ce = (n5 * nll_5 + n_other_words * nll_other) / 6
    image_ce = math.log(cfg.image_vocab_size)
    out = m.loss(text, codes)
    assert out["text_loss"].item() == pytest.approx(text_ce, rel=1e-5)
    assert out["image_loss"].item() == pytest.approx(image_ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(w * text_ce + (1 - w) * image_ce, rel=1e-5)


def test_default_weighting_is_one_eighth_text():
    cfg = _cfg()
    m = DALLETransformer(cfg)
    text, codes = _batch(cfg)
    out = m.loss(text, codes)
    torch.testing.assert_close(out["loss"], out["text_loss"] / 8 + out["image_loss"] * 7 / 8)


def test_resblock_runner_wraps_every_block_and_defaults_to_the_residual():
    torch.manual_seed(0)
    cfg = _cfg()
    m = DALLETransformer(cfg)
    text, codes = _batch(cfg)
    ref = m.loss(text, codes)["loss"]
    seen = []

    def runner(block, x):
        seen.append(block)
        return default_resblock_runner(block, x)

    m.resblock_runner = runner
    assert m.loss(text, codes)["loss"].item() == ref.item()  # same maths, bit for bit
    assert seen == list(m.resblocks) and len(seen) == 2 * cfg.depth

    # A runner that scales the branch changes the result: the model really goes through it.
    m.resblock_runner = lambda block, x: x + 0.5 * block.branch(x)
    assert m.loss(text, codes)["loss"].item() != ref.item()


def test_gradients_reach_every_parameter():
    cfg = _cfg()
    m = DALLETransformer(cfg)
    text, codes = _batch(cfg)
    m.loss(text, codes)["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    # text_embed row 0 (padding) gets no gradient, but the table as a whole does.
    assert not missing, missing


def test_bad_inputs_raise_clear_errors():
    cfg = _cfg()
    m = DALLETransformer(cfg)
    text, codes = _batch(cfg)
    with pytest.raises(ValueError, match="text_len"):
        m(text[:, :-1], codes)
    with pytest.raises(ValueError, match="image codes"):
        m(text, codes + cfg.image_vocab_size)
    with pytest.raises(ValueError, match="text ids"):
        m(text - 1, codes)
    with pytest.raises(ValueError, match="image tokens"):
        m(text, torch.zeros(2, cfg.image_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="text"):
        m(text[:1], codes)


@pytest.mark.parametrize("activation,norm", [("relu", "layernorm"), ("swiglu", "rmsnorm")])
def test_other_activations_and_norms_train(activation, norm):
    cfg = _cfg(**{"transformer.activation": activation, "transformer.norm": norm})
    m = DALLETransformer(cfg)
    text, codes = _batch(cfg)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = m.loss(text, codes)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_initialisation_gains_and_biases():
    m = DALLETransformer(_cfg())
    block = m.resblocks[0]
    assert torch.equal(block.norm.weight, torch.ones_like(block.norm.weight))
    assert torch.equal(block.qkv.bias, torch.zeros_like(block.qkv.bias))
    # Residual-writing projections start smaller than the others (depth-scaled init).
    assert block.proj.weight.std() < block.qkv.weight.std()
