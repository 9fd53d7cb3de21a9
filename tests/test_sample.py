"""`megadalle sample` end to end on a run folder of randomly initialised models (real files, real
models, real KV-cached sampler), and its bad-input errors."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from megadalle.cli import main
from megadalle.errors import CommandError
from megadalle.dvae.io import load_dvae
from megadalle.data.images import labelled_grid, save_png
from megadalle.generate.pipeline import prompt_prefix, read_prompts, sample_caption
from megadalle.commands.sample import load_models, sampling_config

sys.path.insert(0, str(Path(__file__).parent))
from sample_run import build_random_run  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    build_random_run(d)
    return d


def _sample(run_dir, out, *extra):
    return main(["sample", "--ckpt", str(run_dir), "--prompt", "a small red circle at the top",
                 "--prompt", "a large blue square on the left", "--n", "4", "--top", "2", "--out", str(out), *extra])


def test_sample_writes_images_grid_json_and_is_deterministic(run_dir, tmp_path):
    assert _sample(run_dir, tmp_path / "a", "--seed", "7") == 0
    assert _sample(run_dir, tmp_path / "b", "--seed", "7") == 0
    assert _sample(run_dir, tmp_path / "c", "--seed", "8") == 0
    report = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert report["settings"]["seed"] == 7 and report["settings"]["n"] == 4
    assert report["settings"]["reranker"].startswith("megadalle clip")
    assert len(report["captions"]) == 2
    for cap in report["captions"]:
        assert len(cap["images"]) == 4 and len(cap["top"]) == 2
        scores = [im["score"] for im in cap["images"]]
        assert scores == sorted(scores, reverse=True)  # files are named by rank, best first
        assert all((tmp_path / "a" / im["file"]).is_file() for im in cap["images"])
    # One labelled row per caption of its 2 best, 2-pixel lines between the cells.
    with Image.open(tmp_path / "a" / "grid.png") as grid:
        side = Image.open(tmp_path / "a" / report["captions"][0]["images"][0]["file"]).width
        assert grid.size == (max(120, 2 * side) + 2 * (side + 2) + 2, 2 * (side + 2) + 2)

    def pixels(d):
        rep = json.loads((d / "samples.json").read_text())
        return [(d / im["file"]).read_bytes() for cap in rep["captions"] for im in cap["images"]]

    assert pixels(tmp_path / "a") == pixels(tmp_path / "b")
    assert pixels(tmp_path / "a") != pixels(tmp_path / "c")


def test_same_seed_same_codes_whatever_the_batch_size(run_dir):
    args = type("A", (), {"ckpt": str(run_dir), "dvae": None, "tokenizer": None, "clip": None, "no_rerank": True})
    loaded = load_models(args, build_cfg(run_dir), sampling_config(args, build_cfg(run_dir)))
    a = sample_caption(loaded.generator, "a red cross", n=4, batch_size=4, seed=3)
    b = sample_caption(loaded.generator, "a red cross", n=4, batch_size=4, seed=3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.images, b.images)
    assert a.scores is None and a.order.tolist() == [0, 1, 2, 3]


def build_cfg(run_dir):
    from sample_run import small_config

    return small_config(run_dir)


def test_image_prompt_rows_are_kept_exactly(run_dir, tmp_path):
    cfg = build_cfg(run_dir)
    args = type("A", (), {"ckpt": str(run_dir), "dvae": None, "tokenizer": None, "clip": None, "no_rerank": False})
    loaded = load_models(args, cfg, sampling_config(args, cfg))
    dvae = load_dvae(run_dir / "dvae")
    torch.manual_seed(1)
    img = torch.rand(3, 32, 32)
    save_png(img, tmp_path / "prompt.png")
    from megadalle.commands.sample import image_prompt_prefix

    prefix = image_prompt_prefix(loaded, str(tmp_path / "prompt.png"), 2)  # 2 of 4 rows
    assert prefix.shape == (2 * 4,)
    # The prompt is what the dVAE makes of the image file (PNG is lossless up to 8-bit rounding).
    assert torch.equal(prefix, dvae.codes(_png_roundtrip(tmp_path / "prompt.png"))[0, :2].reshape(-1))
    res = sample_caption(loaded.generator, "a green triangle", n=6, batch_size=4, seed=0, prefix=prefix)
    assert res.codes.shape == (6, 16)
    assert torch.equal(res.codes[:, :8], prefix.expand(6, -1))
    assert not torch.equal(res.codes[:, 8:], res.codes[:1, 8:].expand(6, -1))  # the rest is sampled
    # And through the command line.
    assert _sample(run_dir, tmp_path / "ip", "--image-prompt", str(tmp_path / "prompt.png"), "--prompt-rows", "3") == 0
    rep = json.loads((tmp_path / "ip" / "samples.json").read_text())
    assert rep["settings"]["prompt_rows"] == 3


def _png_roundtrip(path):
    from megadalle.data.images import load_image

    return load_image(path, 32).unsqueeze(0)


def test_bad_inputs_give_clear_errors(run_dir, tmp_path, capsys):
    def err(*argv):
        assert main(["sample", *argv]) == 2
        return capsys.readouterr().err

    assert "does not exist" in err("--ckpt", str(tmp_path / "nope"), "--prompt", "x")
    assert "no trained transformer" in err("--ckpt", str(tmp_path), "--prompt", "x")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert "holds no captions" in err("--ckpt", str(run_dir), "--prompt-file", str(empty))
    assert "prompt file" in err("--ckpt", str(run_dir), "--prompt-file", str(tmp_path / "missing.txt"))
    assert "at least one caption" in err("--ckpt", str(run_dir))
    save_png(torch.rand(3, 32, 32), tmp_path / "p.png")
    for rows in ("0", "4", "-1"):
        assert "--prompt-rows" in err("--ckpt", str(run_dir), "--prompt", "x", "--image-prompt",
                                      str(tmp_path / "p.png"), "--prompt-rows", rows)
    assert "go together" in err("--ckpt", str(run_dir), "--prompt", "x", "--prompt-rows", "2")
    assert "not a readable image" in err("--ckpt", str(run_dir), "--prompt", "x", "--image-prompt",
                                         str(empty), "--prompt-rows", "1")
    assert "--n/--top" in err("--ckpt", str(run_dir), "--prompt", "x", "--n", "2", "--top", "3")


def test_mismatched_and_damaged_models_are_refused(run_dir, tmp_path, capsys):
    from megadalle.dvae.io import save_dvae
    from megadalle.dvae.model import DiscreteVAE
    from sample_run import small_config

    other = small_config(tmp_path, **{"dvae.vocab_size": 32, "transformer.image_vocab_size": 32})
    save_dvae(DiscreteVAE(other.dvae), other.dvae, tmp_path / "dvae32")
    assert main(["sample", "--ckpt", str(run_dir), "--prompt", "x", "--dvae", str(tmp_path / "dvae32")]) == 2
    e = capsys.readouterr().err
    assert "do not fit transformer" in e and "32 codes" in e

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "transformer" / "transformer.safetensors").write_bytes(b"junk")
    assert main(["sample", "--ckpt", str(broken), "--prompt", "x"]) == 2
    assert "not a readable safetensors" in capsys.readouterr().err
    (broken / "transformer" / "transformer.yaml").unlink()
    assert main(["sample", "--ckpt", str(broken), "--prompt", "x"]) == 2
    assert "transformer.yaml" in capsys.readouterr().err


def test_read_prompts_and_prefix_helpers(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n# comment\n\n  a blue square  \n")
    assert read_prompts(["x"], str(f)) == ["x", "a red circle", "a blue square"]
    with pytest.raises(CommandError, match="must not be empty"):
        read_prompts(["  "], None)
    codes = torch.arange(16).view(4, 4)
    assert prompt_prefix(codes, 1).tolist() == [0, 1, 2, 3]


def test_grid_labels_each_row_and_separates_the_cells():
    h = w = 40
    colours = [(1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]  # white cells must stay apart too
    rows = [torch.tensor(c).view(1, 3, 1, 1).expand(3, 3, h, w).clone() for c in colours[:2]]
    rows.append(torch.tensor(colours[2]).view(1, 3, 1, 1).expand(2, 3, h, w).clone())  # a short row
    captions = ["a red circle", "x" * 200, "top-left: a small blue square to the left of a large green cross"]
    grid = labelled_grid(rows, captions, pad=2)
    label = 120  # max(120, 2 * w)
    assert grid.shape == (3, 3 * (h + 2) + 2, label + 3 * (w + 2) + 2)
    for i, colour in enumerate(colours):
        top = 2 + i * (h + 2)
        strip = grid[:, top:top + h, 2:label - 2]
        assert (strip < 0.5).any(), f"row {i}: the label strip is blank"
        assert (strip == 1.0).float().mean() > 0.5, f"row {i}: the label strip is not mostly white paper"
        for j in range(3 if i < 2 else 2):
            left = label + 2 + j * (w + 2)
            cell = grid[:, top:top + h, left:left + w]
            assert torch.equal(cell, torch.tensor(colour).view(3, 1, 1).expand(3, h, w)), (i, j)
            # A grey line on either side of every cell, and above and below it.
            assert torch.allclose(grid[:, top:top + h, left - 2:left], torch.tensor(128 / 255))
            assert torch.allclose(grid[:, top:top + h, left + w:left + w + 2], torch.tensor(128 / 255))
            assert torch.allclose(grid[:, top - 2:top, left:left + w], torch.tensor(128 / 255))
            assert torch.allclose(grid[:, top + h:top + h + 2, left:left + w], torch.tensor(128 / 255))
    assert torch.equal(grid[:, 2 + 2 * (h + 2):2 + 2 * (h + 2) + h, -w - 2:-2], torch.ones(3, h, w))  # padded
    with pytest.raises(ValueError, match="one label per row"):
        labelled_grid(rows, captions[:2])
