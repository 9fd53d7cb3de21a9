"""Find and load what sampling needs from a run folder, checking that the pieces fit together.

A run folder (`logging.run_dir`) holds, after the pipeline ran:

    transformer/transformer.safetensors + transformer.yaml   EMA export of `megadalle train`
    dvae/dvae.safetensors + dvae.yaml                         `megadalle train-dvae`
    tokenizer.json                                            `megadalle tokenizer train`
    clip/clip.safetensors + clip.yaml                         `megadalle train-clip` (optional)

`--ckpt` may name the run folder or its transformer/ folder; --dvae, --tokenizer and --clip
override the defaults. Every mismatch (grid size, vocabularies, text length) is an error that
names both sides, since a mismatched dVAE would otherwise decode noise without complaint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadalle.run_layout import RunLayout
from megadalle.errors import CommandError
from megadalle.config import Config, ConfigError

TRANSFORMER_EXPORT = "transformer"


@dataclass
class RunPaths:
    run_dir: Path
    transformer: Path  # folder holding transformer.safetensors + transformer.yaml
    dvae: Path
    tokenizer: Path
    clip: Path | None  # None: no reranker of our own was found


def resolve_paths(ckpt: str | Path, dvae: str | None = None, tokenizer: str | None = None,
                  clip: str | None = None) -> RunPaths:
    p = Path(ckpt)
    if not p.exists():
        raise CommandError(f"--ckpt {p} does not exist; give a run folder (the logging.run_dir of "
                           f"`megadalle train`) or its transformer/ folder")
    if (p / f"{TRANSFORMER_EXPORT}.safetensors").is_file():
        tdir, run_dir = p, p.parent
    elif (p / TRANSFORMER_EXPORT / f"{TRANSFORMER_EXPORT}.safetensors").is_file():
        tdir, run_dir = p / TRANSFORMER_EXPORT, p
    else:
        raise CommandError(f"no trained transformer under {p}: expected {p}/{TRANSFORMER_EXPORT}/"
                           f"{TRANSFORMER_EXPORT}.safetensors (the EMA export `megadalle train` writes at the end); "
                           f"train one first or point --ckpt at the run folder")
    layout = RunLayout(run_dir)
    clip_dir = Path(clip) if clip else (layout.clip if layout.export("clip")[0].is_file() else None)
    if clip and not Path(clip).exists():
        raise CommandError(f"--clip {clip} does not exist")
    return RunPaths(run_dir, tdir, Path(dvae) if dvae else layout.dvae,
                    Path(tokenizer) if tokenizer else layout.tokenizer, clip_dir)


def load_tokenizer(cfg: Config, path: str | Path | None = None) -> Any:
    """The run's BPE tokenizer (tokenizer.path, else <run_dir>/tokenizer.json), checked against
    the config's vocabulary size and text length."""
    from megadalle.data.tokenizer import TextTokenizer, TokenizerFileError

    p = path or RunLayout.from_config(cfg).tokenizer
    try:
        return TextTokenizer.load_for(cfg.tokenizer, p)
    except TokenizerFileError as e:
        raise CommandError(str(e)) from None


def load_run_config(tdir: Path) -> Config:
    """The resolved config the transformer was trained with (its export's yaml)."""
    path = tdir / f"{TRANSFORMER_EXPORT}.yaml"
    if not path.is_file():
        raise CommandError(f"{tdir} has {TRANSFORMER_EXPORT}.safetensors but no {path.name}; re-export the weights")
    try:
        return Config.load(path)
    except ConfigError as e:
        raise CommandError(f"{path} is not a megadalle config: {e}") from None


def load_transformer(tdir: Path, cfg: Config, device: str | torch.device = "cpu") -> torch.nn.Module:
    from safetensors.torch import load_file

    from megadalle.transformer.model import DALLETransformer

    wpath = tdir / f"{TRANSFORMER_EXPORT}.safetensors"
    try:
        state = load_file(str(wpath), device="cpu")
    except Exception as e:  # safetensors raises several types on corrupt files
        raise CommandError(f"{wpath} is not a readable safetensors file ({e}); re-export it") from None
    model = DALLETransformer(cfg.transformer)
    expected = dict(model.state_dict())
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    unexpected = [k for k in state if k not in expected]
    # The export holds parameters only; buffers (if any) are rebuilt from the config.
    missing = [k for k, _ in model.named_parameters() if k not in state]
    if wrong or unexpected or missing:
        raise CommandError(f"{wpath} does not fit the transformer described by {tdir / 'transformer.yaml'}: "
                           f"{len(wrong)} shape mismatches {wrong[:3]}, {len(missing)} missing {missing[:3]}, "
                           f"{len(unexpected)} unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


def check_compatible(cfg: Config, dvae_cfg: Any, tokenizer: Any, paths: RunPaths,
                     fix: str = "Use the dVAE and tokenizer the transformer was trained with (--dvae, --tokenizer)"
                     ) -> None:
    """The dVAE and tokenizer must produce what the transformer was trained on; `fix` ends the message."""
    t = cfg.transformer
    problems = []
    if dvae_cfg.grid_size != t.image_grid:
        problems.append(f"the dVAE makes a {dvae_cfg.grid_size}x{dvae_cfg.grid_size} token grid but the transformer "
                        f"expects {t.image_grid}x{t.image_grid}")
    if dvae_cfg.vocab_size != t.image_vocab_size:
        problems.append(f"the dVAE has {dvae_cfg.vocab_size} codes but the transformer's image vocabulary is "
                        f"{t.image_vocab_size}")
    if tokenizer.vocab_size > t.text_vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens but the transformer's text vocabulary is "
                        f"{t.text_vocab_size}")
    if tokenizer.text_len != t.text_len:
        problems.append(f"captions encode to {tokenizer.text_len} tokens but the transformer reads {t.text_len}")
    if problems:
        raise CommandError(f"dVAE {paths.dvae} / tokenizer {paths.tokenizer} do not fit transformer "
                           f"{paths.transformer}: " + "; ".join(problems) + f". {fix}")
