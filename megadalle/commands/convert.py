"""`megadalle convert KIND ...`: checkpoint conversions, one subcommand per kind.

Add a conversion by adding one entry to SUBCOMMANDS: a help line, a function adding its
arguments, and a function running it (import heavy modules inside it, not at the top).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from megadalle.config import Config


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config], int | None]


def _openai_dvae_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, metavar="PKL", help="OpenAI's encoder.pkl")
    p.add_argument("--decoder", required=True, metavar="PKL", help="OpenAI's decoder.pkl")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for dvae.safetensors + dvae.yaml")
    p.add_argument("--image-size", type=int, default=256,
                   help="image size the dVAE is used at (not stored in the pickles; OpenAI's is 256)")
    p.add_argument("--force", action="store_true", help="overwrite an existing dVAE in --out")


def _openai_dvae_run(args: argparse.Namespace, cfg: Config) -> int:
    from megadalle.dvae.model import count_parameters
    from megadalle.dvae.openai_import import convert

    model_dir, dcfg = convert(args.encoder, args.decoder, args.out, args.image_size, args.force)
    from megadalle.dvae.io import load_dvae

    model = load_dvae(model_dir)
    print(f"wrote {model_dir}/dvae.safetensors + dvae.yaml: encoder {count_parameters(model.encoder):,} and "
          f"decoder {count_parameters(model.decoder):,} parameters, {dcfg.vocab_size} codes, "
          f"{dcfg.image_size}px -> {dcfg.grid_size}x{dcfg.grid_size} tokens")
    return 0


def _zero_to_safetensors_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder (step_*) or a checkpoints folder (uses latest)")
    p.add_argument("--out", required=True, metavar="FILE.safetensors", help="output weights; the config goes "
                   "beside it as FILE.yaml")


def _zero_to_safetensors_run(args: argparse.Namespace, cfg: Config) -> int:
    from megadalle.tools.zero_to_safetensors import consolidate, write

    state, ckpt, meta = consolidate(args.ckpt)
    out, cfg_out = write(state, ckpt, meta, args.out)
    n = sum(t.numel() for t in state.values())
    print(f"wrote {out} ({len(state)} tensors, {n:,} parameters, fp32) and {cfg_out} "
          f"from {ckpt} (step {meta.get('step')}, ZeRO-{meta.get('zero_stage')}, {meta.get('world_size')} ranks)")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "openai-dvae": Subcommand(
        "OpenAI's released dVAE (encoder.pkl + decoder.pkl) -> dvae.safetensors + dvae.yaml, "
        "without the dall_e package and without running pickled code",
        _openai_dvae_arguments, _openai_dvae_run),
    "zero-to-safetensors": Subcommand(
        "a training checkpoint of any ZeRO stage -> one fp32 .safetensors file + its config (.yaml)",
        _zero_to_safetensors_arguments, _zero_to_safetensors_run),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for name, spec in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        spec.add_arguments(p)


def run(args: argparse.Namespace, cfg: Config) -> int | None:
    return SUBCOMMANDS[args.kind].run(args, cfg)
