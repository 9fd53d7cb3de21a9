"""Byte-level BPE for captions (the paper: lowercased, 16,384 tokens, BPE dropout 0.1 in training).

Built on the `tokenizers` library. Id 0 is the padding token `<pad>`: captions are encoded to
exactly `text_len` ids, real tokens first, then zeros (the transformer gives each padded
position its own learned embedding). Byte-level means every string encodes, whatever its
script or bytes; normalisation is NFKC then lowercase.

BPE dropout (Provilkov et al.; the paper uses 0.1) is only applied when `encode` is given one seed
per caption (`dropout_seeds`), which the transformer trainer draws from (run seed, update, the
sample's key). We apply the trained merges ourselves (`SeededBPEDropout`) instead of using the
library's `dropout` option because the library draws from its own unseeded generator: with it, a
run could not be repeated and a resumed run saw different segmentations. With a seed per caption
the segmentation is a function of the sample, so runs repeat, resume is exact, and the draws do not
depend on how a batch is split over ranks. Without dropout (`dropout_seeds=None`, or
`bpe_dropout=0`) encoding is the library's, and `SeededBPEDropout` at p = 0 gives the same ids
(tested). The saved file holds the model without dropout; a reloaded tokenizer gives identical ids.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megadalle.config import ConfigError

PAD = "<pad>"
# Batches up to this size are encoded one caption at a time: the library's `encode_batch` starts
# its own thread pool, which competes with torch's threads for the cores; in the demo's
# transformer stage (micro-batch 32) that cost ~12% of the step rate. Larger batches (the
# tokenizer command, benchmarks) gain from the pool.
PARALLEL_MIN = 1024


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency in pyproject
        raise ImportError("the `tokenizers` package is needed: pip install tokenizers") from e
    return tokenizers


class TokenizerFileError(ConfigError):
    """The tokenizer file is missing or unreadable; the message says what to do."""


class TextTokenizer:
    """Captions <-> fixed-length id tensors; see the module docstring."""

    def __init__(self, tok, text_len: int, bpe_dropout: float = 0.0):
        tk = _require_tokenizers()
        if tok.token_to_id(PAD) != 0:
            raise TokenizerFileError(f"this tokenizer's id 0 is not {PAD!r}; train it with megadalle "
                                     f"(`megadalle tokenizer train`) so that 0 means padding")
        self.text_len = text_len
        self.bpe_dropout = bpe_dropout
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        data = json.loads(tok.to_str())
        if data["model"].get("dropout"):
            # A file saved with dropout inside: keep it out of the evaluation copy.
            data["model"]["dropout"] = None
            self._tok = tk.Tokenizer.from_str(json.dumps(data))
        self._dropout = SeededBPEDropout(self._tok, data) if bpe_dropout > 0 else None
        self.truncated = 0  # captions cut to text_len so far
        self.encoded = 0

    # ---- construction ----
    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 16384, text_len: int = 256,
              bpe_dropout: float = 0.1, lowercase: bool = True, min_frequency: int = 2,
              length: int | None = None) -> "TextTokenizer":
        tk = _require_tokenizers()
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        tok = tk.Tokenizer(models.BPE())
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        tok.normalizer = normalizers.Sequence(norms)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[PAD],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(captions, trainer=trainer, length=length)
        return cls(tok, text_len, bpe_dropout)

    @classmethod
    def from_config(cls, captions: Iterable[str], cfg, length: int | None = None) -> "TextTokenizer":
        """Train with the settings of a `TokenizerConfig`."""
        return cls.train(captions, cfg.vocab_size, cfg.text_len, cfg.bpe_dropout, cfg.lowercase,
                         cfg.min_frequency, length)

    @classmethod
    def load(cls, path: str | Path, text_len: int = 256, bpe_dropout: float = 0.0) -> "TextTokenizer":
        tk = _require_tokenizers()
        path = Path(path)
        if not path.is_file():
            raise TokenizerFileError(f"tokenizer file {path} does not exist; train one with "
                                     f"`megadalle tokenizer train --out {path}`")
        try:
            tok = tk.Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerFileError(f"tokenizer file {path} cannot be read ({e}); retrain it with "
                                     f"`megadalle tokenizer train --out {path}`") from None
        return cls(tok, text_len, bpe_dropout)

    @classmethod
    def load_for(cls, cfg, path: str | Path) -> "TextTokenizer":
        """Load with `text_len` and `bpe_dropout` from a `TokenizerConfig`, checking the vocabulary."""
        t = cls.load(path, cfg.text_len, cfg.bpe_dropout)
        if t.vocab_size > cfg.vocab_size:
            raise TokenizerFileError(f"tokenizer {path} has {t.vocab_size} tokens but tokenizer.vocab_size="
                                     f"{cfg.vocab_size}; retrain it or raise tokenizer.vocab_size")
        return t

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self._tok.save(str(tmp), pretty=True)
        os.replace(tmp, path)
        return path

    # ---- use ----
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def ids(self, caption: str, dropout_seed: int | None = None) -> list[int]:
        """Variable-length ids of one caption (no padding, no truncation); BPE dropout drawn from
        `dropout_seed` when one is given and `bpe_dropout > 0`."""
        if dropout_seed is None or self._dropout is None:
            return self._tok.encode(caption).ids
        return self._dropout.ids(caption, self.bpe_dropout, random.Random(dropout_seed))

    def encode(self, captions: Sequence[str] | str, dropout_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Captions -> long [B, text_len]: ids, then 0 (padding); longer captions are cut.

        `dropout_seeds`: one int per caption turns on BPE dropout (training); the same seed gives
        the same segmentation. None: no dropout (validation, sampling, CLIP)."""
        if isinstance(captions, str):
            captions = [captions]
        captions = list(captions)
        if dropout_seeds is not None and len(dropout_seeds) != len(captions):
            raise ValueError(f"{len(dropout_seeds)} dropout seeds for {len(captions)} captions: give one per caption")
        if dropout_seeds is not None and self._dropout is not None:
            all_ids = [self.ids(c, s) for c, s in zip(captions, dropout_seeds)]
        elif len(captions) > PARALLEL_MIN:
            all_ids = [enc.ids for enc in self._tok.encode_batch(captions)]
        else:
            all_ids = [self._tok.encode(c).ids for c in captions]
        out = torch.zeros(len(captions), self.text_len, dtype=torch.long)
        for i, ids in enumerate(all_ids):
            if len(ids) > self.text_len:
                self.truncated += 1
                ids = ids[:self.text_len]
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.encoded += len(captions)
        return out

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        """long [text_len] -> str, or [B, text_len] -> list[str]; padding (0) is dropped."""
        t = torch.as_tensor(ids)
        if t.dim() == 2:
            return [self.decode(row) for row in t]
        return self._tok.decode([int(i) for i in t.tolist() if i != 0])

    def stats(self) -> dict[str, int]:
        return {"encoded": self.encoded, "truncated": self.truncated}


class SeededBPEDropout:
    """The trained BPE merges applied in Python with dropout drawn from a given `random.Random`.

    Each round, every adjacent pair that has a merge is a candidate, and each candidate is dropped
    with probability p; the surviving candidate of lowest merge rank (leftmost on ties) is merged.
    A word stops when no candidate survives (at p = 0: when no pair has a merge, i.e. plain BPE).
    This is BPE dropout as Provilkov et al. define it. (The library's own variant re-offers dropped
    merges whenever it pops a stale queue entry, so it merges a little more often: on one shapes
    caption, 14.9 tokens on average against 15.6 here at p = 0.1.)
    Normalisation, pre-tokenisation and the special token `<pad>` are the library's own."""

    def __init__(self, tok, data: dict):
        model = data["model"]
        unsupported = [k for k in ("continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
        if model.get("type") != "BPE" or unsupported or model.get("ignore_merges"):
            raise TokenizerFileError(f"BPE dropout needs a plain byte-level BPE model (as `megadalle tokenizer "
                                     f"train` makes); this one has {unsupported or model.get('type')}: retrain it, "
                                     f"or set tokenizer.bpe_dropout=0")
        self._tok = tok
        self._vocab: dict[str, int] = model["vocab"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        self._rank = {pair: r for r, pair in enumerate(merges)}
        self._special = [t["content"] for t in data.get("added_tokens", []) if not t.get("normalized", False)]
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in self._special) + ")") if self._special else None

    def ids(self, caption: str, p: float, rng: random.Random) -> list[int]:
        out: list[int] = []
        pieces = self._special_re.split(caption) if self._special_re else [caption]
        for k, piece in enumerate(pieces):
            if k % 2 == 1:  # a special token matched on the raw text, as the library does
                out.append(self._tok.token_to_id(piece))
                continue
            if not piece:
                continue
            normalised = self._tok.normalizer.normalize_str(piece) if self._tok.normalizer else piece
            for word, _ in self._tok.pre_tokenizer.pre_tokenize_str(normalised):
                out.extend(self._vocab[s] for s in self._merge(list(word), p, rng))
        return out

    def _merge(self, symbols: list[str], p: float, rng: random.Random) -> list[str]:
        rank = self._rank
        while len(symbols) > 1:
            best = None
            for i in range(len(symbols) - 1):
                r = rank.get((symbols[i], symbols[i + 1]))
                if r is None or (p > 0 and rng.random() < p):
                    continue
                if best is None or r < best[0]:
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return symbols
