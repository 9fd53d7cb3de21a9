"""`megadalle tokenizer`: train the caption BPE, or show how captions encode.

    megadalle tokenizer train [--out FILE] [--source shapes|SHARDS|FOLDER] [--max-captions N]
    megadalle tokenizer encode [--path FILE] "a caption" ...

The default output is `tokenizer.path`, else `<logging.run_dir>/tokenizer.json`, where the
trainers look for it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from megadalle.errors import CommandError
from megadalle.config import Config
from megadalle.commands.data import common_options
from megadalle.data.captions import default_path, shapes_captions, shard_captions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = common_options(sub.add_parser("train", help="train the byte-level BPE on captions"))
    t.add_argument("--out", default=None, help="tokenizer file (default: tokenizer.path or <run_dir>/tokenizer.json)")
    t.add_argument("--source", default=None,
                   help="'shapes' (the built-in set's training captions), a directory/glob of .tar shards, or an "
                        "image folder (default: data.source)")
    t.add_argument("--max-captions", type=int, default=0, help="use at most this many captions (0: all)")
    e = common_options(sub.add_parser("encode", help="print the ids of captions"))
    e.add_argument("--path", default=None, help="tokenizer file (default: tokenizer.path or <run_dir>/tokenizer.json)")
    e.add_argument("captions", nargs="+")


def _train(args: argparse.Namespace, cfg: Config) -> int:
    from tqdm import tqdm

    from megadalle.data.shards import ShardError
    from megadalle.data.tokenizer import TextTokenizer

    tc = cfg.tokenizer
    source = args.source or cfg.data.source
    out = Path(args.out) if args.out else default_path(cfg)
    if args.max_captions < 0:
        raise CommandError("--max-captions must be >= 0")
    t0 = time.perf_counter()
    counts: dict[str, int] = {}
    try:
        it = shapes_captions(cfg, args.max_captions) if source == "shapes" else \
            shard_captions(source, counts, args.max_captions)
        captions = list(tqdm(it, desc="captions", unit="cap", mininterval=1.0))
    except ShardError as e:
        raise CommandError(str(e)) from None
    if not captions:
        raise CommandError(f"no usable captions in {source!r}" + (f" (problems: {counts})" if counts else ""))
    tok = TextTokenizer.from_config(captions, tc)
    tok.save(out)
    enc = tok.encode(captions)
    lengths = (enc != 0).sum(1)
    print(f"trained byte-level BPE on {len(captions)} captions from {source}: {tok.vocab_size} tokens "
          f"(limit tokenizer.vocab_size={tc.vocab_size}), lowercase={tc.lowercase}")
    print(f"encoded length: mean {lengths.float().mean():.1f}, max {int(lengths.max())} of text_len={tc.text_len}; "
          f"{tok.truncated} caption(s) truncated")
    if counts:
        print("captions skipped or converted: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _encode(args: argparse.Namespace, cfg: Config) -> int:
    from megadalle.data.tokenizer import TextTokenizer, TokenizerFileError

    path = Path(args.path) if args.path else default_path(cfg)
    try:
        tok = TextTokenizer.load(path, cfg.tokenizer.text_len)
    except TokenizerFileError as e:
        raise CommandError(str(e)) from None
    ids = tok.encode(args.captions)
    for caption, row in zip(args.captions, ids):
        real = [int(i) for i in row if i != 0]
        print(f"{caption!r}: {len(real)} tokens {real}")
    if tok.truncated:
        print(f"{tok.truncated} caption(s) truncated to text_len={tok.text_len}")
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    return _train(args, cfg) if args.action == "train" else _encode(args, cfg)
