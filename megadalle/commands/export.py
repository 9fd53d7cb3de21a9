"""`megadalle export RUN --out DIR`: the run's transformer, dVAE, tokenizer and reranker as one
self-describing folder that `megadalle.Pipeline.from_pretrained(DIR)` and `megadalle sample
--ckpt DIR` load."""

from __future__ import annotations

import argparse

from megadalle.config import Config
from megadalle.tools.export import export_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="run folder (or its transformer/ folder)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must be new or empty)")
    parser.add_argument("--dvae", default=None, metavar="DIR", help="dVAE folder (default: <run>/dvae)")
    parser.add_argument("--tokenizer", default=None, metavar="FILE", help="default: <run>/tokenizer.json")
    parser.add_argument("--clip", default=None, metavar="DIR", help="reranker folder (default: <run>/clip if present)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace, cfg: Config) -> int:
    manifest = export_run(args.run, args.out, dvae=args.dvae, tokenizer=args.tokenizer, clip=args.clip,
                          force=args.force)
    print(f"exported {', '.join(manifest['parts'])} (transformer step {manifest['step']}) from {args.run} to "
          f"{args.out}; load it with Pipeline.from_pretrained({args.out!r}) or `megadalle sample --ckpt {args.out}`")
    return 0
