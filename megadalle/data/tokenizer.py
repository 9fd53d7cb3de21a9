"""Byte-level BPE for captions (the paper: lowercased, 16,384 tokens, BPE dropout 0.1 in training).

Built on the `tokenizers` library. Id 0 is the padding token `<pad>`: captions are encoded to
exactly `text_len` ids, real tokens first, then zeros (the transformer gives each padded
position its own learned embedding). Byte-level means every string encodes, whatever its
script or bytes; normalisation is NFKC then lowercase.

BPE dropout is only applied when `encode(..., train=True)`: the tokenizer keeps two copies of the
same model, one with dropout for training, one without for everything else. The saved file
holds the dropout-free model; a reloaded tokenizer gives identical ids. The library draws its
dropout randomness from its own unseeded generator, so training-time encodings are random and
not reproducible run to run (as in the paper's use); evaluation encodings are deterministic.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megadalle.config import ConfigError

PAD = "<pad>"


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
        if bpe_dropout > 0:
            data["model"]["dropout"] = bpe_dropout
            self._train_tok = tk.Tokenizer.from_str(json.dumps(data))
        else:
            self._train_tok = self._tok
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

    def ids(self, caption: str, train: bool = False) -> list[int]:
        """Variable-length ids of one caption (no padding, no truncation)."""
        return (self._train_tok if train else self._tok).encode(caption).ids

    def encode(self, captions: Sequence[str] | str, train: bool = False) -> torch.Tensor:
        """Captions -> long [B, text_len]: ids, then 0 (padding); longer captions are cut."""
        if isinstance(captions, str):
            captions = [captions]
        tok = self._train_tok if train else self._tok
        out = torch.zeros(len(captions), self.text_len, dtype=torch.long)
        for i, enc in enumerate(tok.encode_batch(list(captions))):
            ids = enc.ids
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
