"""Writing the shapes data set as shards, and building it once per run folder.

Layout (under a run folder): `data/shapes/{train,val,heldout}/shard-NNNNNN.tar` plus a
`manifest.json` per split that records what was generated (settings, counts, shard names). A
split whose manifest matches the current settings and whose shards are all present is reused;
anything else is rebuilt from scratch (generation is deterministic, so a rebuild gives the same
bytes).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from megadalle.run_layout import RunLayout
from megadalle.data.shapes import SPLITS, ShapesDataset, describe_split
from megadalle.data.shards import ShardWriter, read_manifest, write_manifest

SHAPES_FORMAT = 1  # bump when rendering or captions change, so old shards are rebuilt


def shapes_image_size(cfg: Any) -> int:
    return cfg.data.shapes.image_size or cfg.data.image_size


def split_count(shapes_cfg: Any, split: str) -> int:
    return {"train": shapes_cfg.n_train, "val": shapes_cfg.n_val, "heldout": shapes_cfg.n_heldout}[split]


def _png(img) -> bytes:
    buf = io.BytesIO()
    # Fixed compression level: same image, same bytes.
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _settings(shapes_cfg: Any, split: str, n: int, image_size: int) -> dict[str, Any]:
    return {"format": SHAPES_FORMAT, "split": split, "n": n, "image_size": image_size, "seed": shapes_cfg.seed,
            "heldout_fraction": shapes_cfg.heldout_fraction, "max_objects": shapes_cfg.max_objects,
            "two_object_fraction": shapes_cfg.two_object_fraction,
            "samples_per_shard": shapes_cfg.samples_per_shard}


def write_shapes_shards(out_dir: str | Path, split: str, n: int, shapes_cfg: Any, image_size: int,
                        progress: bool = False, start: int = 0) -> dict[str, Any]:
    """Render scenes start..start+n-1 of `split` into shards in `out_dir`; returns the manifest."""
    from tqdm import tqdm

    ds = ShapesDataset(split, shapes_cfg.seed, shapes_cfg.heldout_fraction, image_size,
                       shapes_cfg.max_objects, shapes_cfg.two_object_fraction)
    out_dir = Path(out_dir)
    n_two = 0
    with ShardWriter(out_dir, max_samples=shapes_cfg.samples_per_shard) as writer:
        for i in tqdm(range(start, start + n), desc=f"shapes/{split}", unit="img", disable=not progress,
                      mininterval=1.0):
            sample = ds.sample(i)
            n_two += len(sample.facts.objects) == 2
            writer.write(sample.key, {"png": _png(ds.image(sample)), "txt": sample.caption,
                                      "json": sample.facts.to_json()})
    manifest = {**_settings(shapes_cfg, split, n, image_size), "start": start,
                "shards": [p.name for p in writer.written], "two_object_scenes": n_two,
                "heldout_combos": describe_split(ds.heldout)}
    write_manifest(out_dir, manifest)
    return manifest


def shapes_complete(split_dir: Path, expected: dict[str, Any]) -> bool:
    m = read_manifest(split_dir)
    if m is None or any(m.get(k) != v for k, v in expected.items()):
        return False
    return all((split_dir / name).is_file() for name in m.get("shards", []))


def ensure_shapes_shards(cfg: Any, run_dir: str | Path, splits: Iterable[str] = tuple(SPLITS),
                         progress: bool = False) -> dict[str, Path]:
    """Build (or reuse, if present and complete) the shapes shards of a run: split -> shard dir.

    Splits with zero scenes configured (e.g. n_heldout=0, or heldout_fraction=0) are left out.
    """
    sc = cfg.data.shapes
    size = shapes_image_size(cfg)
    root = RunLayout(Path(run_dir)).shapes()
    out: dict[str, Path] = {}
    for split in splits:
        n = split_count(sc, split)
        if n == 0 or (split == "heldout" and sc.heldout_fraction == 0):
            continue
        split_dir = root / split
        expected = {**_settings(sc, split, n, size), "start": 0}
        if not shapes_complete(split_dir, expected):
            # Built aside and renamed into place, so that ranks racing here (or a build killed
            # half way) never leave a half-written split that looks complete.
            tmp = root / f".{split}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_shapes_shards(tmp, split, n, sc, size, progress=progress)
            if split_dir.exists() and not shapes_complete(split_dir, expected):
                shutil.rmtree(split_dir)
            try:
                os.rename(tmp, split_dir)
            except OSError:  # another process put a split there first
                shutil.rmtree(tmp, ignore_errors=True)
                if not shapes_complete(split_dir, expected):
                    raise
        out[split] = split_dir
    return out
