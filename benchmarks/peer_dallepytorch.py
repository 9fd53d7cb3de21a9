"""megadalle against lucidrains' DALLE-pytorch 1.6.6, side by side at the tiny shape.

Shape on both sides: d 128, depth 4, 4 heads of 32, 32 text tokens + 12x12 image tokens, text and
image vocabularies of 512, layers row / column / row / conv (DALLE-pytorch's
attn_types=('axial_row', 'axial_col', 'axial_row', 'conv_like')). megadalle's side is the `tiny`
preset's transformer; the script stops if that preset no longer has this shape.

    train_fp32   one training step (forward + loss + backward + Adam step), fp32. The tiny preset
                 trains in fp32 (precision.mode), so this is also the preset's own precision.
    train_bf16   the same step under torch.autocast("cpu", bfloat16) on both sides (weights and
                 Adam in fp32 on both; megadalle's trainer in bf16 keeps bf16 weights through
                 DeepSpeed instead, which this does not measure).
    generate     KV-cached generation of the image tokens of 16 images (batch 16) from 16 captions,
                 no VAE decode on either side: megadalle.transformer.sampling.generate (what
                 megadalle's generate pipeline calls) against DALLE-pytorch's
                 generate_images(use_cache=True) with its decode replaced by the identity.

Both sides get the same random batch (same torch build, same generator seed: the workers print a
checksum of it), the same batch size, the same torch thread count, torch.optim.Adam(lr=1e-3) over
the trainable parameters, and the same number of warm-up steps. Each side runs in its own
process, kept alive for the whole run: megadalle's with this venv's Python, DALLE-pytorch's with
a separate venv that this script creates (default benchmarks/.peer_venv, which ignores itself
for git) with `pip install --no-deps` of dalle-pytorch 1.6.6 and the few pure packages it imports
at import time that this venv lacks, the torch of this venv reached through a .pth file (one
torch build for both), and stubs for `taming` (VQGAN only) and `youtokentome` (its tokenizer; it
does not build here). Neither package is importable in the other side's process.

Timing is interleaved: round after round, each side runs a few steps (generation: megadalle,
the much shorter one, 5 timed generations and DALLE-pytorch 1), the order alternating, so that
both see the same load from other users of the machine; the figures are medians over all timed
steps or generations, in wall time and in the worker's CPU time, and the ratios are megadalle's
speed over DALLE-pytorch's.

DALLE-pytorch settings, and why:
  * its defaults otherwise (rotary embeddings, token shift, GEGLU feed-forward, LayerScale): the
    library as it ships; its parameter count is printed next to ours.
  * its DiscreteVAE (only for the shape; frozen, not in the optimizer) is built at 64 px with two
    layers, because it asserts a power-of-two size, then `image_size` is set to 48: 12x12 tokens.
  * generation uses optimize_for_inference=True, its cache-friendly mode: the axial layers become
    masked attention that reads the KV cache; its conv_like layer has no cached form in 1.6.6 and
    recomputes the whole stream at every step (as it does in any 1.6.6 configuration).
  * 1.6.6's forward_with_cond_scale drops the `cache` argument when cond_scale == 1, so
    generate_images(use_cache=True) as shipped recomputes every layer at every step. The script
    passes the cache through (what use_cache=True means), which makes the peer faster, not slower.
    Cached and uncached peer generation agree token for token with the same seed (checked by hand
    when this was written: 100% of tokens with optimize_for_inference=True).

    python benchmarks/peer_dallepytorch.py            # full run, a few minutes
    python benchmarks/peer_dallepytorch.py --quick    # smoke run, a few iterations

Writes benchmarks/results/peer_dallepytorch_train_fp32.json, ..._train_bf16.json and
..._generate.json, one per configuration (see benchmarks/_results.py); a --quick run adds `quick`
to the names so that a smoke run never replaces the measured figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEER_VERSION = "1.6.6"
# dalle-pytorch itself and the pure packages it imports at import time that the main venv lacks,
# at versions from its time: rotary-embedding-torch 0.1.x has the `RotaryEmbedding(...)(positions)`
# and `broadcat` API 1.6.6 calls; omegaconf 2.1 (imported at the top of its vae.py) wants antlr4 4.8.
PEER_PACKAGES = [f"dalle-pytorch=={PEER_VERSION}", "rotary-embedding-torch==0.1.5",
                 "axial-positional-embedding==0.2.1", "omegaconf==2.1.2", "antlr4-python3-runtime==4.8"]
STUBS = {
    "taming/__init__.py": "",
    "taming/models/__init__.py": "",
    "taming/models/vqgan.py": (
        '"""Stub written by benchmarks/peer_dallepytorch.py: DALLE-pytorch imports these for VQGAN only."""\n\n\n'
        "class VQModel:\n    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('taming is stubbed in the benchmark venv: no VQGAN')\n\n\n"
        "class GumbelVQ(VQModel):\n    pass\n"),
    "youtokentome.py": (
        '"""Stub written by benchmarks/peer_dallepytorch.py: youtokentome does not build here and the\n'
        'benchmark uses no tokenizer."""\n\n\n'
        "class BPE:\n    def __init__(self, *args, **kwargs):\n"
        "        raise RuntimeError('youtokentome is stubbed in the benchmark venv')\n\n\n"
        "class OutputType:\n    ID = 0\n    SUBWORD = 1\n"),
}

# The shape both sides are built at; megadalle's `tiny` preset must have it.
SHAPE = {"dim": 128, "depth": 4, "heads": 4, "head_dim": 32, "text_len": 32, "image_grid": 12,
         "text_vocab_size": 512, "image_vocab_size": 512}
PEER_ATTN_TYPES = ("axial_row", "axial_col", "axial_row", "conv_like")
MEGADALLE_LAYERS = ["row", "column", "row", "conv"]
BATCH_SEED, MODEL_SEED, SAMPLE_SEED = 1234, 0, 7
TARGETS = {"train": 3.0, "generate": 30.0}
RESULT_PREFIX = "@@result "


# ---------------------------------------------------------------- both workers

def make_batch(batch: int) -> tuple[Any, Any]:
    """The same random captions (ids 1..511, then padding 0) and image codes on both sides."""
    import torch

    g = torch.Generator().manual_seed(BATCH_SEED)
    T, N = SHAPE["text_len"], SHAPE["image_grid"] ** 2
    text = torch.randint(1, SHAPE["text_vocab_size"], (batch, T), generator=g)
    lengths = torch.randint(4, T + 1, (batch, 1), generator=g)
    text = text.masked_fill(torch.arange(T) >= lengths, 0)  # (batch, T), 0 = padding
    codes = torch.randint(0, SHAPE["image_vocab_size"], (batch, N), generator=g)  # (batch, 144)
    return text, codes


def checksum(*tensors: Any) -> int:
    return int(sum(int((t.long() * (1 + t.new_tensor(range(t.numel())).view_as(t))).sum()) for t in tensors))


class Side:
    """One side of the comparison, living in its own worker process."""

    name = ""

    def __init__(self) -> None:
        self.train_state: dict[str, Any] = {}
        self.gen_state: dict[str, Any] = {}

    # -- to implement: build(kind) -> model, loss(model, text, codes) -> scalar,
    #    sample(model, text) -> codes (B, 144), uniform_loss() -> float

    def setup_train(self, precision: str, batch: int) -> dict[str, Any]:
        import torch

        torch.manual_seed(MODEL_SEED)
        model = self.build("train").train()
        params = [p for p in model.parameters() if p.requires_grad]
        text, codes = make_batch(batch)
        self.train_state = {"model": model, "opt": torch.optim.Adam(params, lr=1e-3), "text": text,
                            "codes": codes, "bf16": precision == "bf16", "loss": None}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            first = float(self.loss(model, text, codes))
        return {"trainable_parameters": sum(p.numel() for p in params), "first_loss": first,
                "uniform_loss": self.uniform_loss(), "batch_checksum": checksum(text, codes)}

    def train(self, steps: int) -> dict[str, Any]:
        import torch

        s = self.train_state
        wall, cpu = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s["bf16"]):
                loss = self.loss(s["model"], s["text"], s["codes"])
            s["opt"].zero_grad(set_to_none=True)
            loss.backward()
            s["opt"].step()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            s["loss"] = loss.detach()
        return {"wall_s": wall, "cpu_s": cpu, "loss": float(s["loss"])}

    def setup_generate(self, batch: int) -> dict[str, Any]:
        import torch

        self.train_state = {}
        torch.manual_seed(MODEL_SEED)
        model = self.build("generate").eval()
        text, _ = make_batch(batch)
        self.gen_state = {"model": model, "text": text}
        return {"parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "batch_checksum": checksum(text)}

    def generate(self, batch: int | None = None, repeats: int = 1) -> dict[str, Any]:
        """`repeats` generations of the same captions, each timed on its own."""
        import torch

        text = self.gen_state["text"][:batch]
        wall, cpu = [], []
        for _ in range(repeats):
            torch.manual_seed(SAMPLE_SEED)
            t0, c0 = time.perf_counter(), time.process_time()
            codes = self.sample(self.gen_state["model"], text)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        N = SHAPE["image_grid"] ** 2
        ok = tuple(codes.shape) == (text.shape[0], N) and 0 <= int(codes.min()) and int(codes.max()) < SHAPE[
            "image_vocab_size"]
        if not ok:
            raise RuntimeError(f"{self.name} generated {tuple(codes.shape)} codes in "
                               f"[{int(codes.min())}, {int(codes.max())}], expected ({text.shape[0]}, {N}) in "
                               f"[0, {SHAPE['image_vocab_size']})")
        return {"wall_s": wall, "cpu_s": cpu, "images": int(text.shape[0]), "tokens": int(codes.numel())}


class Megadalle(Side):
    name = "megadalle"

    def __init__(self) -> None:
        super().__init__()
        sys.path.insert(0, str(ROOT))
        from megadalle.config import load_config

        self.config = load_config("tiny")
        cfg = self.config.transformer
        got = {k: getattr(cfg, k) for k in SHAPE}
        if got != SHAPE:
            raise SystemExit(f"the tiny preset's transformer is no longer the benchmark's shape: {got} != {SHAPE}")

    def build(self, kind: str) -> Any:
        from megadalle.transformer.model import DALLETransformer

        model = DALLETransformer(self.config.transformer)
        if model.layer_types != MEGADALLE_LAYERS:
            raise SystemExit(f"tiny's layer schedule is {model.layer_types}, the benchmark compares "
                             f"{MEGADALLE_LAYERS} with DALLE-pytorch's {PEER_ATTN_TYPES}")
        return model

    def loss(self, model: Any, text: Any, codes: Any) -> Any:
        return model.loss(text, codes)["loss"]

    def uniform_loss(self) -> float:
        return math.log(SHAPE["image_vocab_size"])  # both heads have 512 classes

    def sample(self, model: Any, text: Any) -> Any:
        import torch

        from megadalle.transformer.sampling import generate

        return generate(model, text, generator=torch.Generator().manual_seed(SAMPLE_SEED))

    def info(self) -> dict[str, Any]:
        return {"precision_mode_of_tiny_preset": self.config.precision.mode,
                "model": "megadalle.transformer.model.DALLETransformer(load_config('tiny').transformer)",
                "loss": "DALLETransformer.loss (1/8 text + 7/8 image)",
                "sampler": "megadalle.transformer.sampling.generate (KV cache), temperature 1, no top-k/top-p"}


class DallePytorch(Side):
    name = "dallepytorch"

    def __init__(self) -> None:
        super().__init__()
        import warnings

        warnings.filterwarnings("ignore")  # pkg_resources and torch deprecation notices from 2022 code
        import dalle_pytorch

        self.lib = dalle_pytorch

    def build(self, kind: str) -> Any:
        vae = self.lib.DiscreteVAE(image_size=64, num_layers=2, num_tokens=SHAPE["image_vocab_size"])
        vae.image_size = 48  # 48 px / 2**2 = the 12x12 grid; the VAE is only read for its shape
        model = self.lib.DALLE(dim=SHAPE["dim"], vae=vae, num_text_tokens=SHAPE["text_vocab_size"],
                               text_seq_len=SHAPE["text_len"], depth=SHAPE["depth"], heads=SHAPE["heads"],
                               dim_head=SHAPE["head_dim"], attn_types=PEER_ATTN_TYPES,
                               optimize_for_inference=kind == "generate")
        if kind == "generate":
            model.vae.decode = lambda img_seq: img_seq  # image tokens only, as on megadalle's side
            shipped = model.forward_with_cond_scale

            def forward_with_cond_scale(*args: Any, cond_scale: float = 1, cache: Any = None, **kwargs: Any) -> Any:
                # 1.6.6 calls self(*args, **kwargs) here when cond_scale == 1, dropping the cache.
                if cond_scale == 1:
                    return model(*args, cache=cache, **kwargs)
                return shipped(*args, cond_scale=cond_scale, cache=cache, **kwargs)

            model.forward_with_cond_scale = forward_with_cond_scale
        return model

    def loss(self, model: Any, text: Any, codes: Any) -> Any:
        return model(text, codes, return_loss=True)  # (text CE + 7 image CE) / 8

    def uniform_loss(self) -> float:
        # Text logits span its 512 tokens + 32 per-position padding tokens; image logits 512.
        text_classes = SHAPE["text_vocab_size"] + SHAPE["text_len"]
        return (math.log(text_classes) + 7 * math.log(SHAPE["image_vocab_size"])) / 8

    def sample(self, model: Any, text: Any) -> Any:
        return model.generate_images(text, use_cache=True)

    def info(self) -> dict[str, Any]:
        return {"version": self.lib.__version__,
                "model": f"dalle_pytorch.DALLE(dim=128, depth=4, heads=4, dim_head=32, text_seq_len=32, "
                         f"num_text_tokens=512, attn_types={PEER_ATTN_TYPES}, other arguments default), "
                         f"DiscreteVAE(image_size=64, num_layers=2, num_tokens=512) with image_size set to 48",
                "loss": "DALLE(..., return_loss=True): (text CE + 7 image CE) / 8",
                "sampler": "DALLE.generate_images(use_cache=True), optimize_for_inference=True, defaults "
                           "(filter_thres 0.5 over 1056 logits: no image token filtered), VAE decode replaced "
                           "by the identity, cache passed through forward_with_cond_scale (dropped there in "
                           "1.6.6 when cond_scale == 1)"}


def worker(side_name: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    other = "dalle_pytorch" if side_name == "megadalle" else "megadalle"
    if importlib.util.find_spec(other) is not None:
        raise SystemExit(f"{other} is importable in the {side_name} worker; the sides must not mix")
    side: Side = Megadalle() if side_name == "megadalle" else DallePytorch()
    hello = {"torch": torch.__version__, "torch_file": torch.__file__, "threads": torch.get_num_threads(),
             **side.info()}
    print(RESULT_PREFIX + json.dumps(hello), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "quit":
            break
        try:
            result = getattr(side, op)(**msg)
        except Exception:
            result = {"error": traceback.format_exc()}
        print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver

def main_site_packages() -> Path:
    """The site-packages holding this venv's torch, found without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise SystemExit("torch is not installed in this Python; run with the project's venv (.venv/bin/python)")
    return Path(spec.origin).resolve().parents[1]


def ensure_peer_venv(venv: Path, rebuild: bool) -> Path:
    """The peer venv's Python, creating the venv first when it is missing or out of date."""
    python = venv / "bin" / "python"
    site = main_site_packages()
    spec = json.dumps({"packages": PEER_PACKAGES, "stubs": sorted(STUBS), "main_site_packages": str(site),
                       "python": sys.version})
    ready = venv / ".megadalle-peer-ready"
    if not rebuild and ready.is_file() and ready.read_text() == spec and python.exists():
        return python
    print(f"creating the DALLE-pytorch venv at {venv} (pip install --no-deps {' '.join(PEER_PACKAGES)}) ...",
          flush=True)
    if venv.exists():
        import shutil

        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".gitignore").write_text("# created by benchmarks/peer_dallepytorch.py\n*\n")
    peer_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    *PEER_PACKAGES], check=True)
    for rel, text in STUBS.items():
        (peer_site / rel).parent.mkdir(parents=True, exist_ok=True)
        (peer_site / rel).write_text(text)
    # After the peer's own site-packages: torch and the rest of the main venv, same build on both sides.
    # A path listed in a .pth file is not itself a site dir, so the main venv's editable megadalle
    # (its own .pth there) is not importable in the peer.
    (peer_site / "zz_megadalle_main_venv.pth").write_text(f"{site}\n")
    ready.write_text(spec)
    return python


class Worker:
    def __init__(self, name: str, python: Path | str, threads: int) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONNOUSERSITE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.name = name
        self.proc = subprocess.Popen([str(python), "-u", str(Path(__file__).resolve()), "--worker", name,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(ROOT / "benchmarks"))
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                if "error" in result:
                    raise SystemExit(f"{self.name} worker failed:\n{result['error']}")
                return result
            sys.stderr.write(f"[{self.name}] {line}")
        raise SystemExit(f"{self.name} worker exited (code {self.proc.wait()})")

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def machine(threads: int) -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu_model": model or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": threads, "python": platform.python_version()}


def interleave(workers: dict[str, Worker], rounds: int, op: str,
               per_side: dict[str, dict[str, Any]]) -> dict[str, dict[str, list]]:
    """`rounds` rounds of `op` on every side (its arguments in per_side), the order alternating
    round by round."""
    names = list(workers)
    out: dict[str, dict[str, list]] = {n: {"wall_s": [], "cpu_s": [], "rounds": []} for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            res = workers[name].call(op, **per_side[name])
            wall, cpu = res["wall_s"], res["cpu_s"]
            out[name]["wall_s"] += wall
            out[name]["cpu_s"] += cpu
            out[name]["rounds"].append(res)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {statistics.median(out[n]['rounds'][-1]['wall_s']):.3f} s" for n in names), flush=True)
    return out


def summarise(config: str, timed: dict[str, dict[str, list]], per_item: int, unit: str) -> dict[str, Any]:
    """Medians per side, its/s (or tokens/s) and megadalle / DALLE-pytorch ratios."""
    sides: dict[str, Any] = {}
    for name, t in timed.items():
        med_wall, med_cpu = statistics.median(t["wall_s"]), statistics.median(t["cpu_s"])
        sides[name] = {"median_s": med_wall, "median_cpu_s": med_cpu, f"{unit}_per_s": per_item / med_wall,
                       f"{unit}_per_cpu_s": per_item / med_cpu, "wall_s": t["wall_s"], "cpu_s": t["cpu_s"]}
    md, peer = sides["megadalle"], sides["dallepytorch"]
    target = TARGETS["generate" if config == "generate" else "train"]
    ratio = peer["median_s"] / md["median_s"]
    return {"sides": sides, "ratio": ratio, "ratio_cpu": peer["median_cpu_s"] / md["median_cpu_s"],
            "target": target, "meets_target": ratio >= target}


def run_train(workers: dict[str, Worker], precision: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\ntrain_{precision}: batch {args.batch}, {args.warmup} warm-up step(s), {args.rounds} rounds of "
          f"{args.steps} step(s) per side", flush=True)
    setup = {n: w.call("setup_train", precision=precision, batch=args.batch) for n, w in workers.items()}
    if len({s["batch_checksum"] for s in setup.values()}) != 1:
        raise SystemExit(f"the two sides got different batches: {setup}")
    for n, s in setup.items():
        print(f"  {n:13s} {s['trainable_parameters'] / 1e6:.2f}M trainable parameters; loss on the batch before "
              f"any step {s['first_loss']:.3f} (uniform logits: {s['uniform_loss']:.3f})", flush=True)
    for w in workers.values():
        w.call("train", steps=args.warmup)
    timed = interleave(workers, args.rounds, "train", {n: {"steps": args.steps} for n in workers})
    result = summarise(f"train_{precision}", timed, 1, "steps")
    for n in workers:
        result["sides"][n].update(setup[n], loss_after_last_step=timed[n]["rounds"][-1]["loss"])
    result.update(precision=precision, autocast="torch.autocast('cpu', torch.bfloat16)" if precision == "bf16"
                  else None, batch=args.batch, warmup_steps=args.warmup, rounds=args.rounds,
                  steps_per_round=args.steps, optimizer="torch.optim.Adam(lr=1e-3), trainable parameters")
    return result


def run_generate(workers: dict[str, Worker], args: argparse.Namespace) -> dict[str, Any]:
    N = SHAPE["image_grid"] ** 2
    print(f"\ngenerate: {args.images} images ({N} image tokens each, batch {args.images}), one warm-up "
          f"generation of 2 images, {args.gen_rounds} rounds of {args.gen_repeats} generation(s) for megadalle "
          f"and 1 for DALLE-pytorch", flush=True)
    setup = {n: w.call("setup_generate", batch=args.images) for n, w in workers.items()}
    if len({s["batch_checksum"] for s in setup.values()}) != 1:
        raise SystemExit(f"the two sides got different captions: {setup}")
    for w in workers.values():
        w.call("generate", batch=2)
    # megadalle's generation is ~25x shorter: it runs several per round, so that its median rests
    # on more than a handful of sub-second timings; each round still holds both sides.
    repeats = {"megadalle": args.gen_repeats, "dallepytorch": 1}
    timed = interleave(workers, args.gen_rounds, "generate", {n: {"repeats": repeats[n]} for n in workers})
    result = summarise("generate", timed, args.images * N, "tokens")
    for n in workers:
        s = result["sides"][n]
        s.update(setup[n], images_per_s=s["tokens_per_s"] / N)
    result.update(images=args.images, batch=args.images, image_tokens_per_image=N, rounds=args.gen_rounds,
                  generations_per_round=repeats,
                  vae_decode="excluded on both sides", warmup="one generation of 2 images per side")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a few iterations, writes *_quick.json")
    p.add_argument("--configs", default="train_fp32,train_bf16,generate")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side (the same on both)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the tiny preset's micro batch)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved training rounds (default 6, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per side per round (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per side (default 2, quick 1)")
    p.add_argument("--images", type=int, default=None, help="images generated per call (default 16, quick 4)")
    p.add_argument("--gen-rounds", type=int, default=None, help="interleaved generation rounds (default 4, quick 1)")
    p.add_argument("--gen-repeats", type=int, default=None,
                   help="megadalle generations per round (default 5, quick 2); DALLE-pytorch runs one")
    p.add_argument("--peer-venv", default=str(ROOT / "benchmarks" / ".peer_venv"))
    p.add_argument("--rebuild-peer-venv", action="store_true")
    p.add_argument("--worker", choices=["megadalle", "dallepytorch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.threads)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _results import result_path, write_result

    q = args.quick
    for key, full, quick in (("rounds", 6, 2), ("steps", 3, 1), ("warmup", 2, 1), ("images", 16, 4),
                             ("gen_rounds", 4, 1), ("gen_repeats", 5, 2)):
        if getattr(args, key) is None:
            setattr(args, key, quick if q else full)
    if args.batch is None:
        sys.path.insert(0, str(ROOT))
        from megadalle.config import load_config

        args.batch = load_config("tiny").train.micro_batch_size
    configs = args.configs.split(",")
    unknown = set(configs) - {"train_fp32", "train_bf16", "generate"}
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}")

    started = time.perf_counter()
    peer_python = ensure_peer_venv(Path(args.peer_venv), args.rebuild_peer_venv)
    workers = {"megadalle": Worker("megadalle", sys.executable, args.threads),
               "dallepytorch": Worker("dallepytorch", peer_python, args.threads)}
    try:
        hello = {n: w.hello for n, w in workers.items()}
        if hello["megadalle"]["torch_file"] != hello["dallepytorch"]["torch_file"]:
            raise SystemExit(f"the sides run different torch builds: {hello}")
        mach = machine(args.threads)
        print(f"machine: {mach['cpu_model']}, {mach['cpus']} CPUs, {mach['platform']}; torch "
              f"{hello['megadalle']['torch']} on both sides, {args.threads} thread(s) each; DALLE-pytorch "
              f"{hello['dallepytorch']['version']}; tiny preset trains in {hello['megadalle']['precision_mode_of_tiny_preset']}",
              flush=True)
        results = {}
        for config in configs:
            results[config] = (run_generate(workers, args) if config == "generate"
                               else run_train(workers, config.split("_")[1], args))
    finally:
        for w in workers.values():
            w.close()

    tiny_precision = hello["megadalle"]["precision_mode_of_tiny_preset"]
    print(f"\n{'configuration':14s} {'megadalle':>16s} {'DALLE-pytorch':>16s} {'ratio (wall)':>13s} "
          f"{'ratio (CPU)':>12s} {'target':>7s}")
    written = []
    for config, r in results.items():
        unit, label = ("tokens", "tok/s") if config == "generate" else ("steps", "it/s")
        md, peer = r["sides"]["megadalle"], r["sides"]["dallepytorch"]
        print(f"{config:14s} {md[f'{unit}_per_s']:10.2f} {label:>5s} {peer[f'{unit}_per_s']:10.2f} {label:>5s} "
              f"{r['ratio']:12.2f}x {r['ratio_cpu']:11.2f}x {r['target']:6.0f}x"
              + ("" if r["meets_target"] else "  (below target)"))
        r.update(configuration=config, shape=SHAPE, layers={"megadalle": MEGADALLE_LAYERS,
                                                            "dallepytorch": list(PEER_ATTN_TYPES)},
                 machine=mach, torch=hello["megadalle"]["torch"], quick=q,
                 tiny_preset_precision=tiny_precision,
                 is_tiny_preset_precision=config == "generate" or config == f"train_{tiny_precision}",
                 ratio_is="megadalle speed / DALLE-pytorch speed = DALLE-pytorch median time / megadalle median "
                          "time (wall); ratio_cpu the same with each worker's CPU time",
                 timing="each side in its own long-lived process; rounds alternate the order of the sides; "
                        "medians over all timed steps (generate: over the timed generations)",
                 implementations={n: {k: v for k, v in h.items() if k not in ("torch_file",)}
                                  for n, h in hello.items()},
                 peer_venv_packages=PEER_PACKAGES, peer_stubs=sorted(STUBS))
        out = result_path("peer_dallepytorch", config, "quick" if q else None)
        written.append(write_result(out, r, "peer_dallepytorch", sys.argv[1:], args.threads))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; wrote {', '.join(str(w.relative_to(ROOT)) for w in written)}")


if __name__ == "__main__":
    main()
