"""KV-cached generation against full recomputation, and the sampling controls."""

import pytest
import torch

from megadalle.config import load_config
from megadalle.transformer.model import DALLETransformer
from megadalle.transformer.sampling import (KVCache, filter_logits, forward_cached, generate,
                                            sample_from_logits)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # Every layer type, column's permutation included; a 6x6 grid keeps recomputation cheap.
    cfg = load_config("tiny", overrides={
        "transformer.depth": 4, "transformer.dim": 32, "transformer.heads": 2, "transformer.head_dim": 16,
        "transformer.attention_schedule": "row,column,conv,row", "transformer.image_grid": 6,
        "transformer.text_len": 12, "tokenizer.text_len": 12, "dvae.image_size": 48, "dvae.group_count": 4, "data.image_size": 48,
        "transformer.row_window": 0, "transformer.conv_kernel": 3}).transformer
    m = DALLETransformer(cfg).eval()
    # Larger logits than at initialisation, so that samples depend on the context.
    with torch.no_grad():
        m.image_head.weight.mul_(40)
    return m


def _text(cfg, B=2, seed=1):
    t = torch.randint(1, cfg.text_vocab_size, (B, cfg.text_len), generator=torch.Generator().manual_seed(seed))
    t[:, 7:] = 0
    return t


def test_cached_logits_match_full_forward(model):
    cfg = model.cfg
    text = _text(cfg)
    codes = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    with torch.no_grad():
        _, full = model(text, codes)  # (B, N, Vi)
        cache = KVCache.allocate(model, 2, text.device, torch.float32)
        k = 5  # a multi-token prompt (caption + 5 image tokens), then one token at a time
        h = forward_cached(model, model.embed(text, codes[:, :k]), cache, 0)
        got = [model.image_logits(h[:, cfg.text_len:])]
        for j in range(k, cfg.image_len - 1):
            h = forward_cached(model, model.embed_image(codes[:, j:j + 1], start=j), cache, cfg.text_len + 1 + j)
            got.append(model.image_logits(h))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [
    {},
    {"temperature": 0.7, "top_k": 20},
    {"top_p": 0.9, "guidance_scale": 3.0},
])
def test_cached_generation_equals_recomputation(model, kw):
    text = _text(model.cfg)
    cached = generate(model, text, generator=torch.Generator().manual_seed(3), **kw)
    uncached = generate(model, text, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape == (2, model.cfg.image_len)
    assert 0 <= int(cached.min()) and int(cached.max()) < model.cfg.image_vocab_size
    assert len(set(cached.flatten().tolist())) > 3  # not a degenerate constant image


def test_image_completion_keeps_the_prefix_and_agrees(model):
    cfg = model.cfg
    text = _text(cfg)
    prefix = torch.randint(0, cfg.image_vocab_size, (2, 14))
    a = generate(model, text, prefix_codes=prefix, generator=torch.Generator().manual_seed(5))
    b = generate(model, text, prefix_codes=prefix, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(a[:, :14], prefix) and torch.equal(a, b)
    full = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    assert torch.equal(generate(model, text, prefix_codes=full), full)


def test_greedy_follows_the_models_argmax_and_batches_independently(model):
    cfg = model.cfg
    text = _text(cfg, B=3, seed=7)
    codes = generate(model, text, top_k=1)
    with torch.no_grad():
        _, logits = model(text, codes)
    assert torch.equal(logits.argmax(-1), codes)  # every token is the argmax given the ones before
    for i in range(3):
        assert torch.equal(generate(model, text[i:i + 1], top_k=1), codes[i:i + 1])


def test_guidance_mixes_conditional_and_null_caption_logits(model):
    cfg = model.cfg
    text = _text(cfg)
    s = 2.5
    first = generate(model, text, top_k=1, guidance_scale=s, prefix_codes=torch.zeros(2, 0, dtype=torch.long))
    with torch.no_grad():
        cond = model.image_logits(model.hidden(text, torch.zeros(2, 0, dtype=torch.long))[:, -1])
        null = model.image_logits(model.hidden(torch.zeros_like(text), torch.zeros(2, 0, dtype=torch.long))[:, -1])
    assert torch.equal(first[:, 0], (null + s * (cond - null)).argmax(-1))


def test_same_seed_same_images_other_seed_other_images(model):
    text = _text(model.cfg)
    a = generate(model, text, generator=torch.Generator().manual_seed(11))
    b = generate(model, text, generator=torch.Generator().manual_seed(11))
    c = generate(model, text, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training is False


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    # 0.5 + 0.3 reach 0.8: the third token is dropped, the first two stay.
    assert keep(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert keep(filter_logits(logits, top_p=0.1)) == [True, False, False, False]
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    # Order of tokens does not matter for top-p.
    assert keep(filter_logits(logits.flip(-1), top_p=0.8)) == [False, False, True, True]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.0, 0.3])
    logits = probs.log().expand(20000, 4)
    draws = sample_from_logits(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    assert freq[2] == 0


def test_bad_arguments_are_rejected(model):
    text = _text(model.cfg)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, text, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, text, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, text, top_k=-1)
    with pytest.raises(ValueError, match="text must be"):
        generate(model, text[:, :-1])
    with pytest.raises(ValueError, match="prefix_codes"):
        generate(model, text, prefix_codes=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="prefix_codes must be in"):
        generate(model, text, prefix_codes=torch.full((2, 2), 10**6))
