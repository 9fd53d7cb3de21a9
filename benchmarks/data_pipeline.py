"""Data pipeline figures, measured side by side in one run.

- shapes rendering rate (images/s) at 64 and 256 px,
- loader throughput at 64 px with 0 and 2 DataLoader workers (ratio to 0 workers),
- analyser accuracy (every fact right) on clean renders and under degradations that dVAE
  reconstructions and samples show (blur, JPEG, noise, fading), and its time per image,
- BPE training time on the shapes captions and encoding rate, without dropout (the library) and
  with our seeded BPE dropout (Python), as a ratio.

    python benchmarks/data_pipeline.py [--n 400] [--out benchmarks/results/data_pipeline.json]

`--part orders` compares the loader's two sample orders instead (data/global_order.py): per-slot
streams against the global order, at world size 1 and a simulated world size 4 (one loader per
rank, run one after the other in this process; a real job runs them at once, so the job's rate
is the sum of the ranks'). Per order and world size: samples decoded per CPU second per rank
(CPU time of this process, not wall time: the machines these run on are shared), bytes read per
decoded sample (/proc/self/io, page cache included), and the cost of walking a record's headers
against reading it whole and decoding it. 64 px images without augmentation, 256 px with the stage-1
recipe, and token shards of 32x32 codes; shards on local disk (page cache).

    python benchmarks/data_pipeline.py --part orders [--n 2400] [--worlds 1 4]
        -> benchmarks/results/data_pipeline_orders[_<worlds>].json
"""

from __future__ import annotations

import argparse
import io
import itertools
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

from _results import listed, out_path, write_result  # noqa: E402
from megadalle.config import load_config  # noqa: E402
from megadalle.data.global_order import GlobalWalk  # noqa: E402
from megadalle.data.loader import ShardStats, image_loader, token_loader  # noqa: E402
from megadalle.data.shards import TokenShardWriter, iter_unit_records, source_units  # noqa: E402
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


# --------------------------------------------------------------------------------------------
# The two sample orders
# --------------------------------------------------------------------------------------------

MICRO = 16
BUFFER = 128


def _rchar() -> int | None:
    """Bytes this process has read through read() so far (page cache included); None off Linux."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rank_rate(loader, batches: int) -> tuple[float, float | None]:
    """(samples decoded per second, bytes read per decoded sample) of one rank after its first batch."""
    it = iter(loader)
    next(it)  # start-up and the shuffle buffer's first fill are not the steady state
    io0, t = _rchar(), time.process_time()
    n = sum(len(b["key"]) for b in itertools.islice(it, batches))
    dt, io1 = time.process_time() - t, _rchar()
    return n / dt, None if io0 is None else (io1 - io0) / n


def _order_datasets(tmp: Path, n: int):
    """(name, shard directory, loader factory(rank, world, order)) of the compared data."""
    for size, recipe in ((64, "none"), (256, "stage1")):
        shards = tmp / f"img{size}"
        sc = load_config("tiny", overrides={"data.shapes.samples_per_shard": max(1, n // 8)}).data.shapes
        write_shapes_shards(shards, "train", n, sc, size)
        yield f"{size}px_{recipe}", shards, (
            lambda r, w, order, shards=shards, size=size, recipe=recipe: image_loader(
                shards, MICRO, image_size=size, augment=recipe, rank=r, world_size=w, shuffle_buffer=BUFFER,
                order=order))
    shards = tmp / "tokens"
    rng = np.random.default_rng(0)
    with TokenShardWriter(shards, max_samples=max(1, n // 8)) as writer:
        for i in range(n):
            writer.write_codes(f"t{i:06d}", rng.integers(0, 8192, 1024), f"a caption of sample {i}")
    yield "tokens_1024", shards, (lambda r, w, order, shards=shards: token_loader(
        shards, MICRO, codes_len=1024, rank=r, world_size=w, shuffle_buffer=BUFFER, order=order))


def _per_record_us(shards: Path) -> dict[str, float]:
    """Microseconds per record: walking headers (the global order's extra work on every rank)
    against reading records whole (what a rank does with its own)."""
    units = tuple(source_units(shards))
    walk_us = read_us = float("inf")
    for _ in range(3):
        walk = GlobalWalk(units, 0, BUFFER, ShardStats())
        t = time.process_time()
        walked = sum(1 for _ in iter(walk.next, None))
        walk_us = min(walk_us, 1e6 * (time.process_time() - t) / walked)
        t = time.process_time()
        read = sum(1 for u in units for _ in iter_unit_records(u))
        read_us = min(read_us, 1e6 * (time.process_time() - t) / read)
    return {"walk_us_per_record": walk_us, "read_us_per_record": read_us}


def _compare_orders(make, shards: Path, n: int, worlds: list[int], repeats: int) -> dict:
    out: dict = {}
    for order in ("slots", "global"):
        for w in worlds:
            batches = max(2, n // (MICRO * w) - 1)  # about n samples decoded by all ranks together
            ranks = [max(_rank_rate(make(r, w, order), batches) for _ in range(repeats)) for r in range(w)]
            rates = [x[0] for x in ranks]
            io_per = [x[1] for x in ranks if x[1] is not None]
            out[f"{order}_w{w}"] = {"per_rank_samples_per_s": sum(rates) / w, "job_samples_per_s": sum(rates),
                                    "read_bytes_per_sample": sum(io_per) / len(io_per) if io_per else None}
    for w in worlds:
        ratio = out[f"global_w{w}"]["job_samples_per_s"] / out[f"slots_w{w}"]["job_samples_per_s"]
        out[f"global_vs_slots_w{w}"] = ratio
    out.update(_per_record_us(shards))
    # A rank walks G records per optimizer step and decodes G / w: the walk costs as much as the
    # decoding from this many ranks on (per DataLoader worker).
    out["decode_us_per_sample"] = 1e6 / out[f"slots_w{worlds[0]}"]["per_rank_samples_per_s"]
    out["walk_equals_decode_at_world"] = out["decode_us_per_sample"] / out["walk_us_per_record"]
    return out


def orders(args: argparse.Namespace) -> None:
    n = args.n or 2400
    worlds = args.worlds
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU", "n": n,
                    "micro_batch": MICRO, "shuffle_buffer": BUFFER, "worlds": worlds, "repeats": args.repeats,
                    "data": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shards, make in _order_datasets(Path(tmp), n):
            result["data"][name] = _compare_orders(make, shards, n, worlds, args.repeats)
    print(f"machine: {result['machine']}; micro-batch {MICRO}, shuffle buffer {BUFFER}, {n} samples in 8 shards")
    for name, r in result["data"].items():
        print(f"{name}:")
        for w in worlds:
            s, g = r[f"slots_w{w}"], r[f"global_w{w}"]
            io_text = ""
            if s["read_bytes_per_sample"] is not None:
                io_text = (f"; read {s['read_bytes_per_sample'] / 1024:.1f} vs "
                           f"{g['read_bytes_per_sample'] / 1024:.1f} KiB per decoded sample")
            print(f"  world {w}: per rank {s['per_rank_samples_per_s']:.0f} (slots) vs "
                  f"{g['per_rank_samples_per_s']:.0f} (global) samples/s: x{r[f'global_vs_slots_w{w}']:.2f}{io_text}")
        print(f"  walk {r['walk_us_per_record']:.1f} us/record, read whole {r['read_us_per_record']:.1f} us/record, "
              f"read+decode {r['decode_us_per_sample']:.0f} us/sample: the walk costs as much as decoding at "
              f"~{r['walk_equals_decode_at_world']:.0f} ranks")
    out = out_path(args.out, "data_pipeline", "orders", listed(worlds, [1, 4]))
    write_result(out, result, "data_pipeline", sys.argv[1:], int(os.environ.get("OMP_NUM_THREADS", "1")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "orders"), default="all",
                        help="all: the figures above; orders: the loader's two sample orders side by side")
    parser.add_argument("--n", type=int, default=None, help="images per measurement (400; orders: 2400)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 4], help="orders: simulated world sizes")
    parser.add_argument("--repeats", type=int, default=2, help="orders: the best of this many runs per rank")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/data_pipeline[_orders].json")
    args = parser.parse_args()
    if args.part == "orders":
        orders(args)
        return
    args.n = args.n or 400
    args.out = str(out_path(args.out, "data_pipeline"))
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
