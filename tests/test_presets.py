"""Every preset builds on the meta device; 12b has the paper's shapes and size."""

import pytest
import torch

from megadalle.config import PRESETS, load_config
from megadalle.transformer.masks import dalle_attention_schedule
from megadalle.transformer.model import AttentionBlock, DALLETransformer, MLPBlock, count_parameters


def _meta_model(preset: str) -> DALLETransformer:
    with torch.device("meta"):
        return DALLETransformer(load_config(preset).transformer)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_builds_on_meta(preset):
    m = _meta_model(preset)
    cfg = m.cfg
    assert all(p.device.type == "meta" for p in m.parameters())
    assert len(m.resblocks) == 2 * cfg.depth
    assert [type(b) for b in m.resblocks[:2]] == [AttentionBlock, MLPBlock]
    # Shapes flow through on meta as well (no data needed to check the wiring).
    text = torch.zeros(1, cfg.text_len, dtype=torch.long, device="meta")
    codes = torch.zeros(1, cfg.image_len, dtype=torch.long, device="meta")
    tl, il = m(text, codes) if preset in ("tiny", "small") else (None, None)
    if tl is not None:
        assert tl.shape == (1, cfg.text_len, cfg.text_vocab_size) and tl.dtype == torch.float32
        assert il.shape == (1, cfg.image_len, cfg.image_vocab_size) and il.dtype == torch.float32


def test_12b_has_the_papers_shapes_and_size():
    m = _meta_model("12b")
    c = m.cfg
    assert (c.depth, c.heads, c.head_dim, c.dim) == (64, 62, 64, 3968)
    assert (c.text_len, c.image_grid, c.text_vocab_size, c.image_vocab_size) == (256, 32, 16384, 8192)
    assert len(m.resblocks) == 128  # the paper's 128 per-resblock gradient scales
    assert m.layer_types == dalle_attention_schedule(64)
    assert m.layer_types[-1] == "conv" and m.layer_types[1] == "column" and m.layer_types[0] == "row"
    assert m.resblocks[0].qkv.weight.shape == (3 * 3968, 3968)
    assert m.resblocks[1].fc_in.weight.shape == (4 * 3968, 3968)
    assert m.text_head.weight.shape == (16384, 3968) and m.image_head.weight.shape == (8192, 3968)
    assert m.pad_embed.shape == (256, 3968)  # one padding token per text position
    n = count_parameters(m)
    assert abs(n - 12.0e9) / 12.0e9 < 0.03, n
