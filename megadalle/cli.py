"""`megadalle <command>`: parse, build the config, hand over to the command's module.

Every command lives in its own module with two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace, cfg: megadalle.config.Config) -> int | None

and is listed once in COMMANDS. Modules are imported only when their command runs, so
`megadalle --help` works on a bare CPU machine without DeepSpeed being importable.

Every command also takes `--preset NAME`, `--config FILE.yaml` and dotted overrides such as
`--transformer.depth=8` (or `--transformer.depth 8`); precedence is CLI > file > preset.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megadalle.config import PRESETS, load_config
from megadalle.errors import CommandError, ConfigError

# name -> (module, one-line help). Add a command here and nowhere else.
COMMANDS: dict[str, tuple[str, str]] = {
    # In pipeline order: `megadalle --help` lists them this way.
    "demo": ("megadalle.commands.demo", "the whole pipeline on the built-in shapes data, end to end (--quick: 1-2 min smoke run)"),
    "data": ("megadalle.commands.data", "build the shapes data set as shards; check shards for bad input"),
    "tokenizer": ("megadalle.commands.tokenizer", "train the caption BPE tokenizer; show encodings"),
    "train-dvae": ("megadalle.commands.train_dvae", "train the discrete VAE (stage 1); exports <run_dir>/dvae/"),
    "encode": ("megadalle.commands.encode", "turn image shards into dVAE token shards for stage 2 (parallel over ranks, resumable)"),
    "reconstruct": ("megadalle.commands.reconstruct", "encode and decode images with a dVAE; side-by-side PNGs"),
    "train": ("megadalle.commands.train", "train the stage-2 transformer on token shards (DeepSpeed)"),
    "train-clip": ("megadalle.commands.train_clip", "train the contrastive reranker on the image shards"),
    "sample": ("megadalle.commands.sample", "generate images for captions, rerank, write a grid and JSON"),
    "eval": ("megadalle.commands.eval", "sample a caption set and score it (shapes accuracy, CLIP score, FID/IS)"),
    "export": ("megadalle.commands.export", "one self-describing model folder (transformer, dVAE, tokenizer, reranker) from a run"),
    "convert": ("megadalle.commands.convert", "convert checkpoints (openai-dvae, zero-to-safetensors)"),
    "inspect": ("megadalle.commands.inspect", "show what a training checkpoint holds (step, sizes, dtypes, config)"),
    "plan": ("megadalle.commands.plan", "memory per GPU and traffic per step of a model on a cluster (dry run)"),
    "smoke": ("megadalle.commands.smoke", "communication smoke test of a cluster or launcher (all-reduces under the watchdog)"),
    "launch": ("megadalle.commands.launch", "launch helpers for job scripts: a deepspeed hostfile, the discovered rank layout"),
}


def _without_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` that the deepspeed launcher puts before the command name (its
    `--module megadalle train ...` runs `python -m megadalle --local_rank=0 train ...`); rank
    discovery reads LOCAL_RANK from the environment instead."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.split("=", 1)[0] in ("--local_rank", "--local-rank"):
            i += 1 if "=" in tok else 2
            continue
        out.append(tok)
        i += 1
    return out


def _split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--a.b=v` / `--a.b v` overrides from arguments nobody claimed."""
    overrides, unknown = [], []
    i = 0
    while i < len(extra):
        tok = extra[i]
        name = tok[2:].split("=", 1)[0] if tok.startswith("--") else ""
        if "." in name:
            if "=" in tok:
                overrides.append(tok)
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                overrides.append(f"{tok}={extra[i + 1]}")
                i += 1
            else:
                unknown.append(tok)
        else:
            unknown.append(tok)
        i += 1
    return overrides, unknown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megadalle",
        description="Train DALL-E-style text-to-image models (dVAE + sparse transformer) on DeepSpeed.",
        epilog="Every command takes --preset {%s}, --config FILE.yaml and dotted overrides "
               "such as --transformer.depth=8." % ",".join(PRESETS))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--preset", default=None, choices=list(PRESETS), help="named configuration to start from")
        p.add_argument("--config", default=None, metavar="FILE", help="YAML config (overrides the preset)")
        p.set_defaults(_module=module)
        # Each command's own arguments are added lazily in main(), once we know which one runs.
    return parser


def run() -> None:
    """The `megadalle` program: main(), then sys.exit; a process that ran a process group leaves
    through distributed.engine.exit_process, which C++ teardown cannot abort."""
    code = main()
    engine = sys.modules.get("megadalle.distributed.engine")
    if engine is not None and engine.started_a_group():
        engine.exit_process(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = _without_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] in ("-V", "--version"):
        from megadalle import __version__

        print(f"megadalle {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"megadalle: unknown command {name!r}; commands: {', '.join(COMMANDS) or '(none)'}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"megadalle {name}", description=COMMANDS[name][1])
    sub.add_argument("--preset", default=None, choices=list(PRESETS), help="named configuration to start from")
    sub.add_argument("--config", default=None, metavar="FILE", help="YAML config (overrides the preset)")
    sub.add_argument("--print-config", action="store_true",
                     help="print the resolved config (defaults <- preset <- file <- overrides) as YAML and exit")
    module.add_arguments(sub)
    args, extra = sub.parse_known_args(argv[1:])
    overrides, unknown = _split_overrides(extra)
    if unknown:
        sub.print_usage(sys.stderr)
        print(f"megadalle {name}: unrecognised arguments: {' '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.preset, args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        rc = module.run(args, cfg)
    except (ConfigError, CommandError) as e:
        print(f"megadalle {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A file system failure outside the paths that report their own (full disk, a folder that
        # is a file, ...): one line naming the path, not a traceback. MEGADALLE_DEBUG=1 shows it.
        if os.environ.get("MEGADALLE_DEBUG"):
            raise
        print(f"megadalle {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megadalle {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
