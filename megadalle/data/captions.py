"""Captions for training the BPE tokenizer: from the built-in shapes set or from shards, and
where a run keeps its tokenizer file."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from megadalle.config import Config
from megadalle.run_layout import RunLayout


def default_path(cfg: Config) -> Path:
    return RunLayout.from_config(cfg).tokenizer


def shapes_captions(cfg: Config, limit: int = 0) -> Iterator[str]:
    """Captions of the shapes training split (the same ones its shards hold), without rendering."""
    from megadalle.data.shapes import ShapesDataset

    ds = ShapesDataset.from_config(cfg.data.shapes, "train", image_size=cfg.data.image_size)
    n = cfg.data.shapes.n_train if not limit else min(limit, cfg.data.shapes.n_train)
    for i in range(n):
        yield ds.sample(i).caption


def shard_captions(source: str, counts: dict[str, int], limit: int = 0) -> Iterator[str]:
    """Captions of a shard set or image folder; missing or empty ones are counted in `counts`."""
    from megadalle.data.decode import BadSample, decode_caption
    from megadalle.data.shards import Record, iter_unit_records, source_units

    n = 0
    for unit in source_units(source):
        for rec in iter_unit_records(unit):
            if not isinstance(rec, Record):
                counts[rec.reason] = counts.get(rec.reason, 0) + 1
                continue
            conversions: list[str] = []
            try:
                text = decode_caption(rec, conversions)
            except BadSample as e:
                counts[e.reason] = counts.get(e.reason, 0) + 1
                continue
            for c in conversions:
                counts[c] = counts.get(c, 0) + 1
            yield text
            n += 1
            if limit and n >= limit:
                return
