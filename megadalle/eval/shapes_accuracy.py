"""Shapes accuracy: does a generated image show what its caption says?

The caption's facts come from `data.shapes.parse_caption`, the image's from the analyser
`data.shapes.analyse`, and `data.shapes.compare` matches them attribute by attribute; this
module adds the seen / held-out split and the caption sets the demo and `eval` use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from megadalle.errors import CommandError
from megadalle.data import shapes as S
from megadalle.eval.summary import Judgement


def caption_split(facts: S.ShapeFacts, heldout: frozenset[tuple[str, str]]) -> str:
    """"heldout" when any object is a (shape, colour) combination never shown in training."""
    return "heldout" if any((o.shape, o.colour) in heldout for o in facts.objects) else "seen"


def judge(image: Any, caption: str, heldout: frozenset[tuple[str, str]]) -> Judgement:
    expected = S.parse_caption(caption)
    if expected is None:
        raise CommandError(f"caption {caption!r} names no shape of the shapes data ({', '.join(S.SHAPES)}); "
                           f"shapes accuracy needs captions in that vocabulary")
    matches = S.compare(expected, S.analyse(image))
    return Judgement(caption, caption_split(expected, heldout), len(expected.objects), matches)


def heldout_of(cfg: Any) -> frozenset[tuple[str, str]]:
    """The held-out (shape, colour) combinations of a run's shapes config."""
    return S.heldout_combos(cfg.data.shapes.seed, cfg.data.shapes.heldout_fraction)


def eval_captions(cfg: Any, n_seen: int, n_heldout: int, n_pairs: int,
                  seed: int = 1234) -> list[tuple[str, S.ShapeFacts]]:
    """A fixed caption set: single-object captions of seen and of held-out combinations (each
    (shape, colour, cell) at most once), then a few two-object captions. Drawn from the
    generator's own phrasing so the wording is in-distribution; `seed` keeps them apart from
    the training scenes' random streams. Returns (caption, the facts it was written from)."""
    heldout = heldout_of(cfg)
    rng = np.random.default_rng([seed, cfg.data.shapes.seed])
    seen_singles, held_singles, pairs, used = [], [], [], set()
    for _ in range(100_000):
        if len(seen_singles) >= n_seen and len(held_singles) >= n_heldout and len(pairs) >= n_pairs:
            break
        split = "heldout" if heldout and rng.random() < 0.5 else "train"
        facts = S.sample_scene(rng, split, heldout, max_objects=2, two_object_fraction=0.3)
        text = S.caption(facts, rng)
        if len(facts.objects) == 2:
            if len(pairs) < n_pairs and split == "train":
                pairs.append((text, facts))
            continue
        o = facts.objects[0]
        key = (o.shape, o.colour, o.row, o.col)
        if key in used:
            continue
        target = held_singles if split == "heldout" else seen_singles
        limit = n_heldout if split == "heldout" else n_seen
        if len(target) < limit:
            used.add(key)
            target.append((text, facts))
    return seen_singles + held_singles + pairs
