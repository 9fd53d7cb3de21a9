"""Per-sample randomness that does not depend on how a batch is split over ranks.

A trainer that draws noise for a sample (the dVAE's Gumbel noise, the transformer's caption
dropout) seeds it from (run seed, update, the sample's key): the same global batch gives the same
draws on 1 or N ranks, and a resumed run needs no RNG state to repeat them.
"""

from __future__ import annotations

import hashlib


def sample_seed(seed: int, update: int, key: str) -> int:
    """A stable 63-bit seed for one sample at one update (not Python's salted `hash`)."""
    digest = hashlib.blake2b(f"{seed}/{update}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_uniform(seed: int, update: int, key: str) -> float:
    """A uniform draw in [0, 1) for one sample at one update, from `sample_seed`."""
    return sample_seed(seed, update, key) / 2.0 ** 63
