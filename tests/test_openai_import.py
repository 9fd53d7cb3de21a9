"""Import of OpenAI-format dVAE pickles: numerical equivalence, and refusal of anything else."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F

from megadalle.cli import main
from megadalle.errors import CommandError
from megadalle.dvae import loss as L
from megadalle.dvae.io import load_dvae
from megadalle.dvae.openai_import import convert, import_openai_dvae
from openai_dalle_standins import Decoder, Encoder, pickle_as_dall_e

GEOM = dict(group_count=3, n_hid=8, n_blk_per_group=2, vocab_size=32)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    torch.manual_seed(0)
    enc, dec = Encoder(**GEOM), Decoder(n_init=12, output_channels=3, **GEOM)
    d = tmp_path_factory.mktemp("openai")
    pickle_as_dall_e(enc, d / "encoder.pkl")
    pickle_as_dall_e(dec, d / "decoder.pkl")
    return enc.eval(), dec.eval(), d


def test_stand_ins_are_gone_while_loading(released):
    assert "dall_e" not in sys.modules and "dall_e.encoder" not in sys.modules


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_import_matches_original_modules(released, tmp_path, zip_format):
    enc, dec, d = released
    if not zip_format:
        d = tmp_path
        pickle_as_dall_e(enc, d / "encoder.pkl", zip_format=False)
        pickle_as_dall_e(dec, d / "decoder.pkl", zip_format=False)
    out, cfg = convert(d / "encoder.pkl", d / "decoder.pkl", tmp_path / "ours", image_size=16)
    assert (cfg.n_hid, cfg.group_count, cfg.n_blk_per_group, cfg.vocab_size, cfg.n_init) == (8, 3, 2, 32, 12)
    ours = load_dvae(out)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        # The released encoder expects pixels already mapped to (eps, 1 - eps).
        want_logits = enc(L.map_pixels(x, 0.1))
        torch.testing.assert_close(ours.logits(x), want_logits, rtol=1e-5, atol=1e-5)
        codes = want_logits.argmax(1)
        one_hot = F.one_hot(codes, 32).permute(0, 3, 1, 2).float()  # (B, V, g, g)
        want_stats = dec(one_hot)
        torch.testing.assert_close(ours.decoder(one_hot), want_stats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode_stats(codes), want_stats, rtol=1e-5, atol=1e-5)
        want_img = L.unmap_pixels(torch.sigmoid(want_stats[:, :3]), 0.1)
        torch.testing.assert_close(ours.reconstruct(x), want_img, rtol=1e-5, atol=1e-5)


def test_cli_convert_and_refuses_to_overwrite(released, tmp_path, capsys):
    _, _, d = released
    args = ["convert", "openai-dvae", "--encoder", str(d / "encoder.pkl"), "--decoder", str(d / "decoder.pkl"),
            "--out", str(tmp_path / "o"), "--image-size", "16"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    before = (tmp_path / "o" / "dvae.safetensors").read_bytes()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "o" / "dvae.safetensors").read_bytes() == before
    assert main(args + ["--force"]) == 0


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_save", "inside_module", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "encoder.pkl"
    if how == "torch_save":
        torch.save({"w": torch.zeros(1), "x": _Evil(marker)}, path)
    elif how == "inside_module":
        enc = Encoder(**GEOM)
        enc.payload = _Evil(marker)
        pickle_as_dall_e(enc, path)
    else:
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    assert not marker.exists()
    with pytest.raises(CommandError, match=r"refused to load .*system"):
        import_openai_dvae(path, path)
    assert not marker.exists()


def test_bad_inputs_give_clear_errors(released, tmp_path):
    _, _, d = released
    with pytest.raises(CommandError, match="does not exist"):
        import_openai_dvae(tmp_path / "nope.pkl", d / "decoder.pkl")
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x00not a pickle at all")
    with pytest.raises(CommandError, match="junk.pkl"):
        import_openai_dvae(junk, d / "decoder.pkl")
    with pytest.raises(CommandError, match="swapped"):
        import_openai_dvae(d / "decoder.pkl", d / "encoder.pkl")
    other = pickle_as_dall_e(Decoder(n_init=12, **{**GEOM, "vocab_size": 64}), tmp_path / "dec64.pkl")
    with pytest.raises(CommandError, match="vocab size: encoder 32 vs decoder 64"):
        import_openai_dvae(d / "encoder.pkl", other)
    plain = tmp_path / "state.pkl"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CommandError, match="not a pickled dall_e module"):
        import_openai_dvae(plain, d / "decoder.pkl")
    with pytest.raises(CommandError, match="image_size"):
        import_openai_dvae(d / "encoder.pkl", d / "decoder.pkl", image_size=18)
