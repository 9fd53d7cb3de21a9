"""`megadalle encode` (image shards -> token shards) and `megadalle reconstruct`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megadalle.cli import main
from megadalle.errors import CommandError
from megadalle.config import DataConfig, DVAEConfig
from megadalle.data.loader import token_loader
from megadalle.data.shards import ShardWriter
from megadalle.dvae import DiscreteVAE, save_dvae
from megadalle.dvae.encode import encode_source

SIZE = 16


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    torch.manual_seed(0)
    cfg = DVAEConfig(image_size=SIZE, n_hid=8, n_init=8, group_count=3, vocab_size=32)
    model = DiscreteVAE(cfg).eval()
    save_dvae(model, cfg, root / "dvae")
    rng = np.random.default_rng(0)
    images: dict[str, np.ndarray] = {}
    for s in range(3):
        with ShardWriter(root / "src", max_samples=100, append=True) as w:
            for j in range(5):
                key = f"s{s}-{j}"
                if (s, j) == (1, 2):
                    w.write(key, {"png": b"not a png", "txt": "broken image"})
                    continue
                arr = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                if (s, j) == (2, 0):
                    w.write(key, {"png": _png(arr)})  # no caption
                    continue
                images[key] = arr
                w.write(key, {"png": _png(arr), "txt": f"caption {key}"})
    return root, model, images


def _data() -> DataConfig:
    return DataConfig(image_size=SIZE, min_image_side=8)


def test_encode_over_two_ranks_round_trip_and_resume(setup, tmp_path):
    root, model, images = setup
    out = tmp_path / "tokens"
    s0 = encode_source(str(root / "src"), root / "dvae", out, _data(), rank=0, world=2, progress=False)
    s1 = encode_source(str(root / "src"), root / "dvae", out, _data(), rank=1, world=2, progress=False)
    # Rank r takes units r, r+2, ...
    assert (s0.units, s0.written, s1.units, s1.written) == (2, 2, 1, 1)
    assert s0.samples + s1.samples == len(images) == 13
    skipped = s0.skipped + s1.skipped
    assert sum(skipped.values()) == 2 and set(skipped) == {"undecodable_image", "missing_caption"}
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar",
                                                               "shard-000002.tar"]
    assert json.loads((out / "encode-rank00001.json").read_text())["samples"] == s1.samples

    # Read back with the stage-2 token loader: argmax codes of each image, caption and key kept.
    grid = model.cfg.grid_size
    loader = token_loader(out, 64, codes_len=grid * grid, shuffle_buffer=0, endless=False, rank=0, world_size=1)
    got = {}
    for batch in loader:
        if batch is None:
            continue
        for key, codes, cap in zip(batch["key"], batch["codes"], batch["caption"]):
            got[key] = (codes, cap)
    assert set(got) == set(images)
    keys = sorted(images)
    x = torch.stack([torch.from_numpy(images[k]).permute(2, 0, 1).float() / 255 for k in keys])  # (B, 3, H, W)
    want = model.codes(x).flatten(1)
    codes = torch.stack([got[k][0] for k in keys])
    assert torch.equal(codes, want) and all(got[k][1] == f"caption {k}" for k in keys)
    # Decoding the stored tokens gives the model's reconstruction.
    torch.testing.assert_close(model.decode(codes), model.reconstruct(x))

    # Resume: complete shards are kept as they are, a missing one (and a stale partial) redone.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar").unlink()
    (out / ".shard-000001.partial").mkdir()
    again0 = encode_source(str(root / "src"), root / "dvae", out, _data(), rank=0, world=2, progress=False)
    again1 = encode_source(str(root / "src"), root / "dvae", out, _data(), rank=1, world=2, progress=False)
    assert (again0.already_done, again0.written, again0.samples) == (2, 0, 0)
    assert (again1.already_done, again1.written, again1.samples) == (0, 1, s1.samples)
    assert not (out / ".shard-000001.partial").exists()
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000002.tar"] == before["shard-000002.tar"]


def test_encode_refuses_mixing_sources_and_bad_inputs(setup, tmp_path):
    root, _, _ = setup
    out = tmp_path / "tokens"
    encode_source(str(root / "src" / "shard-000000.tar"), root / "dvae", out, _data(), progress=False)
    with pytest.raises(CommandError, match="different source"):
        encode_source(str(root / "src"), root / "dvae", out, _data(), progress=False)
    with pytest.raises(CommandError, match="no dvae.yaml"):
        encode_source(str(root / "src"), root / "src", tmp_path / "o2", _data(), progress=False)
    with pytest.raises(CommandError, match="does not exist"):
        encode_source(str(tmp_path / "missing"), root / "dvae", tmp_path / "o3", _data(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="holds no .tar shards"):
        encode_source(str(tmp_path / "empty"), root / "dvae", tmp_path / "o3", _data(), progress=False)
    with pytest.raises(CommandError, match="batch-size"):
        encode_source(str(root / "src"), root / "dvae", tmp_path / "o3", _data(), batch_size=0, progress=False)


def test_encode_command_uses_launcher_rank(setup, tmp_path, monkeypatch, capsys):
    root, _, _ = setup
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "t"
    rc = main(["encode", "--preset", "tiny", "--input", str(root / "src"), "--dvae", str(root / "dvae"),
               "--out", str(out), "--device", "cpu", "--logging.progress=false", "--data.min_image_side=8"])
    assert rc == 0
    assert "rank 1/2" in capsys.readouterr().out
    assert [p.name for p in out.glob("shard-*.tar")] == ["shard-000001.tar"]


def test_reconstruct_command(setup, tmp_path, capsys):
    root, model, images = setup
    a = tmp_path / "a.png"
    Image.fromarray(next(iter(images.values()))).save(a)
    wide = tmp_path / "sub" / "a.png"  # same name, other folder, not square
    wide.parent.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(wide)
    out = tmp_path / "out"
    assert main(["reconstruct", str(a), str(wide), "--dvae", str(root / "dvae"), "--out", str(out)]) == 0
    assert "mean PSNR" in capsys.readouterr().out
    with Image.open(out / "a.png") as im:
        assert im.size == (2 * SIZE + 3 * 2, SIZE + 2 * 2)  # original | reconstruction, padded
        left = np.asarray(im)[2:2 + SIZE, 2:2 + SIZE]
    assert np.array_equal(left, np.asarray(Image.open(a)))
    assert (out / "a-1.png").is_file()


def test_reconstruct_bad_inputs(setup, tmp_path, capsys):
    root, _, _ = setup
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    out = tmp_path / "out"
    cases = [
        ([str(good), str(tmp_path / "missing.png")], str(root / "dvae"), "does not exist"),
        ([str(good), str(text)], str(root / "dvae"), "not a readable image"),
        ([str(good)], str(tmp_path), "no dvae.yaml"),
        ([str(good)], str(tmp_path / "nodir"), "does not exist"),
    ]
    for imgs, dvae, msg in cases:
        assert main(["reconstruct", *imgs, "--dvae", dvae, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()  # nothing half-written
