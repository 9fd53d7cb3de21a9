"""dVAE architecture: sizes of the paper's model, shapes, fp32 islands, weights on disk."""

from __future__ import annotations

import pytest
import torch
import yaml

from megadalle.errors import CommandError
from megadalle.config import DVAEConfig, load_config
from megadalle.dvae import DiscreteVAE, load_dvae, save_dvae
from megadalle.dvae.model import count_parameters


def tiny_cfg(**kw) -> DVAEConfig:
    return DVAEConfig(**{**dict(image_size=16, n_hid=8, n_init=8, group_count=3, vocab_size=16), **kw})


def test_full_preset_sizes_on_meta_device():
    cfg = DVAEConfig()
    with torch.device("meta"):
        m = DiscreteVAE(cfg)
    # The released encoder.pkl / decoder.pkl hold about 54M and 44M parameters.
    assert count_parameters(m.encoder) == 53_786_240
    assert count_parameters(m.decoder) == 43_829_766
    x = torch.empty(2, 3, 256, 256, device="meta")
    logits = m.logits(x)
    assert logits.shape == (2, 8192, 32, 32) and logits.dtype == torch.float32
    stats = m.decoder(torch.empty(2, 8192, 32, 32, device="meta"))
    assert stats.shape == (2, 6, 256, 256)
    names = dict(m.named_parameters())
    for n in ("encoder.blocks.input.w", "encoder.blocks.group_1.block_1.res_path.conv_1.w",
              "encoder.blocks.group_2.block_1.id_path.w", "encoder.blocks.output.conv.b",
              "decoder.blocks.input.w", "decoder.blocks.group_4.block_2.res_path.conv_4.w"):
        assert n in names
    assert names["encoder.blocks.group_1.block_1.res_path.conv_4.w"].shape == (256, 64, 1, 1)
    assert names["decoder.blocks.group_1.block_1.res_path.conv_1.w"].shape == (512, 128, 1, 1)  # 1x1 first
    assert names["decoder.blocks.group_1.block_1.res_path.conv_4.w"].shape == (2048, 512, 3, 3)  # 3x3 last
    assert "encoder.blocks.group_1.block_1.id_path.w" not in names  # same width: identity


def test_tiny_preset_geometry():
    cfg = load_config("tiny").dvae
    m = DiscreteVAE(cfg)
    x = torch.rand(2, 3, 48, 48)
    codes = m.codes(x)  # 48 px, three groups: 4x4-pixel patches
    assert codes.shape == (2, 12, 12) and codes.dtype == torch.long and int(codes.max()) < 512
    assert m.decode(codes).shape == (2, 3, 48, 48)
    assert m.decode(codes.flatten(1)).shape == (2, 3, 48, 48)  # row-major flat tokens too


@pytest.mark.parametrize("groups, blocks", [(2, 1), (3, 3)])
def test_configurable_depth(groups, blocks):
    cfg = tiny_cfg(group_count=groups, n_blk_per_group=blocks)
    m = DiscreteVAE(cfg)
    assert m.logits(torch.rand(1, 3, 16, 16)).shape == (1, 16, cfg.grid_size, cfg.grid_size)
    assert len([k for k in m.state_dict() if k.startswith("encoder.blocks.group_1.block_")
                and k.endswith("conv_1.w")]) == blocks


def test_decode_from_codes_equals_one_hot_convolution():
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg())
    torch.nn.init.normal_(m.decoder.blocks.input.b)
    codes = torch.randint(0, 16, (2, 4, 4))
    one_hot = torch.nn.functional.one_hot(codes, 16).permute(0, 3, 1, 2).float()  # (B, V, g, g)
    torch.testing.assert_close(m.decode_stats(codes), m.decoder(one_hot), rtol=1e-5, atol=1e-6)


def test_fp32_islands_under_mixed_precision():
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg())
    x = torch.rand(2, 3, 16, 16)
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0].dtype, o.dtype)))
             for n, mod in (("enc_out", m.encoder.blocks.output.conv), ("dec_in", m.decoder.blocks.input),
                            ("enc_mid", m.encoder.blocks.group_2.block_1.res_path.conv_2))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.logits(x)
        m.decoder(torch.softmax(logits, 1))
    assert seen["enc_mid"][1] == torch.bfloat16  # the rest does run in 16 bits
    assert seen["enc_out"][1] == torch.float32 and logits.dtype == torch.float32
    assert seen["dec_in"][1] == torch.float32
    # DeepSpeed-style bf16 weights: the islands still compute in fp32.
    m16 = DiscreteVAE(tiny_cfg()).to(torch.bfloat16)
    assert m16.logits(x).dtype == torch.float32
    assert m16.decoder.blocks.input(torch.softmax(m16.logits(x), 1)).dtype == torch.float32
    assert m16(x, 1.0, 1.0)["loss"].dtype == torch.float32
    for h in hooks:
        h.remove()


def test_bad_image_shape_is_reported():
    m = DiscreteVAE(tiny_cfg())
    with pytest.raises(ValueError, match="dvae.image_size=16"):
        m.logits(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        m.decode(torch.full((1, 4, 4), 16))


def test_save_load_roundtrip_and_bad_folders(tmp_path):
    torch.manual_seed(0)
    m = DiscreteVAE(tiny_cfg())
    save_dvae(m, m.cfg, tmp_path / "d")
    back = load_dvae(tmp_path / "d")
    assert back.cfg == m.cfg
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(back.logits(x), m.logits(x), rtol=0, atol=0)

    with pytest.raises(CommandError, match="does not exist"):
        load_dvae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="no dvae.yaml"):
        load_dvae(tmp_path / "empty")
    with pytest.raises(CommandError, match="is a file"):
        load_dvae(tmp_path / "d" / "dvae.yaml")

    # Weights written for a different width than the yaml says.
    save_dvae(DiscreteVAE(tiny_cfg(n_hid=12)), tiny_cfg(), tmp_path / "w")
    with pytest.raises(CommandError, match="shape mismatches.*n_hid"):
        load_dvae(tmp_path / "w")
    (tmp_path / "w" / "dvae.yaml").write_text("n_hid: [1, 2\n")
    with pytest.raises(CommandError, match="not valid YAML"):
        load_dvae(tmp_path / "w")
    (tmp_path / "w" / "dvae.yaml").write_text(yaml.safe_dump({"n_hid": 10}))
    with pytest.raises(CommandError, match="divisible by 4"):
        load_dvae(tmp_path / "w")
    (tmp_path / "w" / "dvae.yaml").write_text(yaml.safe_dump({"n_hidden": 8}))
    with pytest.raises(CommandError, match="unknown config key"):
        load_dvae(tmp_path / "w")
    (tmp_path / "w" / "dvae.yaml").write_text(yaml.safe_dump(vars(tiny_cfg())))
    (tmp_path / "w" / "dvae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CommandError, match="not a readable safetensors"):
        load_dvae(tmp_path / "w")
    (tmp_path / "w" / "dvae.safetensors").unlink()
    with pytest.raises(CommandError, match="no dvae.safetensors"):
        load_dvae(tmp_path / "w")


@pytest.mark.parametrize("value", [1.0, 0.25])
def test_decoder_output_starts_at_the_configured_pixel_value(value):
    """With dvae.init_pixel_value the untrained decoder's output bias decodes to that value
    (only the bias is set: the weights keep OpenAI's initialisation)."""
    cfg = load_config("tiny", None, {"dvae.init_pixel_value": value}).dvae
    torch.manual_seed(0)
    model = DiscreteVAE(cfg)
    conv = model.decoder.blocks.output.conv
    pixel = model.stats_to_image(conv.b.view(1, -1, 1, 1))
    torch.testing.assert_close(pixel, torch.full_like(pixel, value))
    assert torch.equal(conv.b[3:], torch.zeros(3))
    default = DiscreteVAE(load_config("tiny", None, {"dvae.init_pixel_value": -1}).dvae)
    assert torch.equal(default.decoder.blocks.output.conv.b, torch.zeros(6))
