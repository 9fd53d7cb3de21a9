"""`megadalle encode`: image shards -> token shards for stage 2.

Input unit i of the source (a tar shard, or a chunk of an image folder) becomes
`<out>/shard-{i:06d}.tar` holding `{key}.codes.npy` (uint16, the flat row-major grid of argmax
codes, no noise) and `{key}.txt`, in input order. Ranks need no process group: rank r of w (from
whichever launcher started it) takes units r, r+w, r+2w, ... Each output shard is built in a
temporary folder and renamed into place when complete, so a rerun skips every shard already
there and redoes only what an interruption cut off. `<out>/units.json` records which source unit
each index stands for, so that resuming against a different source is refused rather than mixed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadalle.errors import CommandError
from megadalle.config import DataConfig

UNITS_FILE = "units.json"


@dataclass
class EncodeSummary:
    rank: int = 0
    world: int = 1
    units: int = 0  # units assigned to this rank
    written: int = 0  # shards written by this run
    already_done: int = 0  # shards found complete and skipped
    samples: int = 0  # samples encoded by this run
    skipped: Counter = field(default_factory=Counter)  # bad samples / shard problems by reason
    out_dir: str = ""

    def describe(self) -> str:
        bad = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"rank {self.rank}/{self.world}: {self.samples} samples encoded into {self.written} token shard(s); "
                f"{self.already_done} of {self.units} shard(s) already complete and kept; "
                f"skipped: {bad}; in {self.out_dir}")

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "units": self.units, "written": self.written,
                "already_done": self.already_done, "samples": self.samples, "skipped": dict(self.skipped)}


def _check_units(out: Path, units: list[str]) -> None:
    path = out / UNITS_FILE
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != units:
            raise CommandError(f"{out} holds token shards of a different source (see {path}); "
                               f"choose another --out or delete that folder to start over")
        return
    # Every rank writes the same content; the rename makes the racing writes harmless.
    tmp = out / f".{UNITS_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(units, indent=1))
    os.replace(tmp, path)


def _image_tensor(record: Any, data: DataConfig, size: int) -> torch.Tensor:
    from megadalle.data.augment import augment, to_tensor
    from megadalle.data.decode import decode_image

    img = decode_image(record, data.min_image_side, data.max_aspect_ratio, [], data.max_image_pixels)
    # "none": centre crop + resize, deterministic; tokens must not depend on a random crop.
    return to_tensor(augment(img, size, "none", np.random.default_rng(0)))


@torch.no_grad()
def encode_unit(model: Any, unit: str, final: Path, data: DataConfig, batch_size: int,
                device: torch.device, summary: EncodeSummary) -> None:
    from megadalle.data.decode import BadSample, decode_caption
    from megadalle.data.shards import ReadProblem, TokenShardWriter, iter_unit_records

    size = model.cfg.image_size
    tmp_dir = final.with_name(f".{final.stem}.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    pending: list[tuple[str, str, torch.Tensor]] = []
    n = 0

    def flush(writer: TokenShardWriter) -> None:
        nonlocal n
        if not pending:
            return
        x = torch.stack([p[2] for p in pending]).to(device)  # (B, 3, H, W)
        codes = model.codes(x).flatten(1).cpu().numpy()  # (B, grid*grid) row-major
        for (key, caption, _), c in zip(pending, codes):
            writer.write_codes(key, c, caption)
        n += len(pending)
        pending.clear()

    with TokenShardWriter(tmp_dir, max_samples=2**62) as writer:
        for item in iter_unit_records(unit):
            if isinstance(item, ReadProblem):
                summary.skipped[item.reason] += 1
                continue
            try:
                caption = decode_caption(item, [])
                pending.append((item.key, caption, _image_tensor(item, data, size)))
            except BadSample as e:
                summary.skipped[e.reason] += 1
                continue
            if len(pending) >= batch_size:
                flush(writer)
        flush(writer)
    written = writer.written
    if written:
        os.replace(written[0], final)
        summary.written += 1
        summary.samples += n
    shutil.rmtree(tmp_dir, ignore_errors=True)


def encode_source(source: str, dvae_dir: str | Path, out_dir: str | Path, data: DataConfig,
                  rank: int = 0, world: int = 1, batch_size: int = 64, device: str = "cpu",
                  progress: bool = True) -> EncodeSummary:
    from megadalle.data.shards import ShardError, shard_name, source_units
    from megadalle.dvae.io import load_dvae

    if batch_size < 1:
        raise CommandError("--batch-size must be >= 1")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available here; use --device cpu")
    model = load_dvae(dvae_dir, device=dev)
    try:
        units = [str(u) for u in source_units(source)]
    except ShardError as e:
        raise CommandError(str(e)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_units(out, units)
    mine = list(range(rank, len(units), world))
    summary = EncodeSummary(rank=rank, world=world, units=len(mine), out_dir=str(out))
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"encode rank {rank}", unit="shard", dynamic_ncols=True)
    for i in mine:
        final = out / shard_name(i)
        if final.is_file():
            summary.already_done += 1
        else:
            encode_unit(model, units[i], final, data, batch_size, dev, summary)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(samples=summary.samples)
    if bar is not None:
        bar.close()
    report = out / f"encode-rank{rank:05d}.json"
    tmp = report.with_name(report.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_dict(), indent=1))
    os.replace(tmp, report)
    return summary
