"""Data pipeline figures, measured side by side in one run.

- shapes rendering rate (images/s) at 64 and 256 px,
- loader throughput at 64 px with 0 and 2 DataLoader workers (ratio to 0 workers),
- analyser accuracy (every fact right) on clean renders and under degradations that dVAE
  reconstructions and samples show (blur, JPEG, noise, fading), and its time per image,
- BPE training time on the shapes captions and encoding rate, without dropout (the library) and
  with our seeded BPE dropout (Python), as a ratio.

    python benchmarks/data_pipeline.py [--n 400] [--out benchmarks/results/data_pipeline.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from megadalle.config import load_config  # noqa: E402
from megadalle.data.loader import image_loader  # noqa: E402
from megadalle.data.shapes import ShapesDataset, analyse, compare, summarise_scores  # noqa: E402
from megadalle.data.shapes_shards import write_shapes_shards  # noqa: E402
from megadalle.data.tokenizer import TextTokenizer  # noqa: E402


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def degradations(rng: np.random.Generator):
    def noise(img, sigma):
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8))

    def fade(img):
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray((0.8 * (0.6 * a + 0.4 * a.mean(-1, keepdims=True)) + 10).astype(np.uint8))

    return {
        "clean": lambda im: im,
        "blur_1px": lambda im: im.filter(ImageFilter.GaussianBlur(1.0)),
        "blur_2px": lambda im: im.filter(ImageFilter.GaussianBlur(2.0)),
        "jpeg_q20": lambda im: _jpeg(im, 20),
        "noise_20": lambda im: noise(im, 20),
        "faded": fade,
        "blur_1.5px+noise_15+jpeg_q50": lambda im: _jpeg(noise(im.filter(ImageFilter.GaussianBlur(1.5)), 15), 50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400, help="images per measurement")
    parser.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = parser.parse_args()
    cfg = load_config("tiny")
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "n": args.n}

    # Rendering
    for size in (64, 256):
        ds = ShapesDataset("train", image_size=size)
        t = time.perf_counter()
        for i in range(args.n):
            ds.image(ds.sample(i))
        results[f"render_{size}px_img_per_s"] = args.n / (time.perf_counter() - t)

    # Loader: throughput after the first batch (worker start-up excluded), at 64 px without
    # augmentation (the demo) and at 256 px with the stage-1 recipe (decode + resize + crop).
    results["loader_img_per_s"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size, recipe in ((64, "none"), (256, "stage1")):
            shards = Path(tmp) / f"train{size}"
            sc = load_config("tiny", overrides={"data.shapes.samples_per_shard": max(1, args.n // 8)}).data.shapes
            write_shapes_shards(shards, "train", args.n, sc, size)
            rates = {}
            for workers in (0, 2):
                loader = image_loader(shards, 16, image_size=size, augment=recipe, rank=0, world_size=1,
                                      endless=False, shuffle_buffer=128, num_workers=workers)
                it = iter(loader)
                next(it)
                t = time.perf_counter()
                n = sum(len(b["key"]) for b in it)
                rates[f"workers_{workers}"] = n / (time.perf_counter() - t)
            rates["ratio_2_vs_0"] = rates["workers_2"] / rates["workers_0"]
            results["loader_img_per_s"][f"{size}px_{recipe}"] = rates

    # Analyser
    rng = np.random.default_rng(0)
    ds = ShapesDataset("val", image_size=64, two_object_fraction=0.3)
    samples = [ds.sample(i) for i in range(args.n)]
    images = [ds.image(s) for s in samples]
    accuracy = {}
    for name, f in degradations(rng).items():
        scores = [compare(s.facts, analyse(f(img))) for s, img in zip(samples, images)]
        accuracy[name] = summarise_scores(scores)["all"]
    results["analyser_accuracy_64px"] = accuracy
    t = time.perf_counter()
    for img in images:
        analyse(img)
    results["analyser_ms_per_img_64px"] = 1000 * (time.perf_counter() - t) / len(images)

    # Tokenizer
    captions = [ShapesDataset("train").sample(i).caption for i in range(20000)]
    t = time.perf_counter()
    tok = TextTokenizer.from_config(captions, cfg.tokenizer)
    results["bpe_train_s_20000_captions"] = time.perf_counter() - t
    t = time.perf_counter()
    tok.encode(captions)
    results["bpe_encode_captions_per_s"] = len(captions) / (time.perf_counter() - t)
    t = time.perf_counter()
    tok.encode(captions, dropout_seeds=list(range(len(captions))))
    results["bpe_dropout_encode_captions_per_s"] = len(captions) / (time.perf_counter() - t)
    results["bpe_vocab_size"] = tok.vocab_size

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"machine: {results['machine']}")
    print(f"render: {results['render_64px_img_per_s']:.0f} img/s at 64 px, "
          f"{results['render_256px_img_per_s']:.0f} img/s at 256 px")
    for name, r in results["loader_img_per_s"].items():
        print(f"loader {name}: {r['workers_0']:.0f} img/s with 0 workers, {r['workers_2']:.0f} img/s with 2 "
              f"(x{r['ratio_2_vs_0']:.2f})")
    print("analyser accuracy (all facts right), 64 px: "
          + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
          + f"; {results['analyser_ms_per_img_64px']:.1f} ms/img")
    print(f"BPE: trained on 20000 captions in {results['bpe_train_s_20000_captions']:.2f}s "
          f"({tok.vocab_size} tokens), encodes {results['bpe_encode_captions_per_s']:.0f} captions/s; "
          f"with seeded dropout {results['bpe_dropout_encode_captions_per_s']:.0f} captions/s "
          f"({results['bpe_dropout_encode_captions_per_s'] / results['bpe_encode_captions_per_s']:.2f}x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
