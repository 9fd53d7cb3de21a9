"""`megadalle.Pipeline` and `--device/--dtype`: sampling from Python, on any device, in any
precision, with the same tokens as the transformer's own `generate` for the same seed."""

from __future__ import annotations

import json

import pytest
import torch

from megadalle import cli
from megadalle.errors import CommandError
from megadalle.generate.pipeline import caption_seed
from sample_run import build_random_run

torch.set_num_threads(1)
CAPTION = "a small red circle at the top"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    build_random_run(d)
    return d


def _reference_codes(run_dir, dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """What the transformer's own sampler gives for the caption with the pipeline's seeding."""
    from megadalle.generate.load import load_run_config, load_tokenizer, load_transformer, resolve_paths
    from megadalle.transformer.sampling import generate

    paths = resolve_paths(run_dir)
    cfg = load_run_config(paths.transformer)
    model = load_transformer(paths.transformer, cfg).to(dtype)
    text = load_tokenizer(cfg, paths.tokenizer).encode([CAPTION]).expand(n, -1)
    g = torch.Generator().manual_seed(caption_seed(seed, 0, 0))
    return generate(model, text, generator=g)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_pipeline_gives_generates_tokens(run_dir, dtype, torch_dtype):
    from megadalle import Pipeline

    pipe = Pipeline.from_run(run_dir, device="cpu", dtype=dtype, rerank=False, n=4, batch_size=4)
    assert pipe.device == torch.device("cpu") and next(pipe.loaded.transformer.parameters()).dtype == torch_dtype
    (result,) = pipe.sample(CAPTION, seed=3)
    assert torch.equal(result.codes, _reference_codes(run_dir, torch_dtype, 4, 3))
    # Options per call: another seed, other tokens; the same seed again, the same tokens.
    assert not torch.equal(pipe.sample(CAPTION, seed=4)[0].codes, result.codes)
    assert torch.equal(pipe.sample(CAPTION, seed=3)[0].codes, result.codes)
    # A call's sampling options apply to that call only, also when the next call gives none.
    default = pipe.sample(CAPTION)[0].codes
    hot = pipe.sample(CAPTION, temperature=3.0)[0].codes
    assert not torch.equal(hot, default)
    assert torch.equal(pipe.sample(CAPTION)[0].codes, default)


def test_pipeline_returns_pil_images_and_matches_the_command(run_dir, tmp_path):
    from PIL import Image

    from megadalle import Pipeline

    pipe = Pipeline.from_run(run_dir, device="cpu")  # reranks with the run's clip/
    images = pipe([CAPTION, "a large blue square on the left"], n=4, top=2, seed=7)
    assert len(images) == 2 and all(len(row) == 2 for row in images)
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for row in images for im in row)
    # `megadalle sample` with the same settings writes the same best image.
    assert cli.main(["sample", "--ckpt", str(run_dir), "--prompt", CAPTION, "--n", "4", "--top", "2", "--seed", "7",
                     "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "samples.json").read_text())
    assert report["settings"]["device"] == "cpu" and report["settings"]["dtype"] == "float32"
    best = Image.open(tmp_path / report["captions"][0]["images"][0]["file"]).convert("RGB")
    assert best.tobytes() == images[0][0].tobytes()


def test_bad_device_dtype_and_options_are_messages(run_dir, capsys):
    from megadalle import Pipeline

    assert cli.main(["sample", "--ckpt", str(run_dir), "--prompt", "x", "--dtype", "fp16", "--device", "cpu"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["sample", "--ckpt", str(run_dir), "--prompt", "x", "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert cli.main(["sample", "--ckpt", str(run_dir), "--prompt", "x", "--device", "gpu!"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    pipe = Pipeline.from_run(run_dir, device="cpu", rerank=False, n=2)
    with pytest.raises(CommandError, match="unknown sampling option"):
        pipe.sample(CAPTION, temprature=0.5)
    with pytest.raises(CommandError, match="top_p"):
        pipe.sample(CAPTION, top_p=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_pipeline_on_the_gpu(run_dir, dtype):
    from megadalle import Pipeline

    pipe = Pipeline.from_run(run_dir, device="cuda", dtype=dtype, rerank=False, n=4)
    (result,) = pipe.sample(CAPTION, seed=3)
    assert result.codes.shape == (4, 16) and result.codes.device.type == "cpu"
    assert torch.isfinite(result.images).all() and result.images.shape == (4, 3, 32, 32)
    assert torch.equal(pipe.sample(CAPTION, seed=3)[0].codes, result.codes)  # seeded on the GPU too


def test_export_then_from_pretrained_reproduces_the_runs_samples(run_dir, tmp_path, capsys):
    from megadalle import Pipeline

    out = tmp_path / "exported"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "exported transformer, dvae, tokenizer, clip" in capsys.readouterr().out
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["format"] == "megadalle-export" and manifest["parts"] == ["transformer", "dvae", "tokenizer", "clip"]
    card = (out / "README.md").read_text()
    assert "Pipeline.from_pretrained" in card and "| transformer | d 32, depth 2" in card
    from_run = Pipeline.from_run(run_dir, device="cpu", n=4)
    from_export = Pipeline.from_pretrained(out, device="cpu", n=4)
    a, b = from_run.sample(CAPTION, seed=5)[0], from_export.sample(CAPTION, seed=5)[0]
    assert torch.equal(a.codes, b.codes) and torch.equal(a.images, b.images) and torch.equal(a.scores, b.scores)
    # The command line reads the export too.
    assert cli.main(["sample", "--ckpt", str(out), "--prompt", CAPTION, "--n", "2", "--top", "1",
                     "--out", str(tmp_path / "s")]) == 0


def test_export_refuses_what_does_not_fit(run_dir, tmp_path, capsys):
    import shutil

    from megadalle import Pipeline
    from megadalle.dvae.io import save_dvae
    from megadalle.dvae.model import DiscreteVAE
    from sample_run import small_config

    out = tmp_path / "exported"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 2  # not empty: nothing overwritten
    assert "is not empty" in capsys.readouterr().err
    # A dVAE with another code book does not fit the transformer: refused, and nothing written.
    other = small_config(tmp_path, **{"dvae.vocab_size": 32, "transformer.image_vocab_size": 32}).dvae
    save_dvae(DiscreteVAE(other), other, tmp_path / "other_dvae")
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "bad"), "--dvae", str(tmp_path / "other_dvae")]) == 2
    assert "has 32 codes but the transformer's image vocabulary is 64" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # A run folder is not an export, and a damaged manifest is refused.
    with pytest.raises(CommandError, match="not an exported model folder"):
        Pipeline.from_pretrained(run_dir)
    copy = shutil.copytree(out, tmp_path / "copy")
    (copy / "export.json").write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(CommandError, match="is not a megadalle-export version 1 manifest"):
        Pipeline.from_pretrained(copy)
