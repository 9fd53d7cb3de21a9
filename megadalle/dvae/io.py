"""dVAE weights on disk: `<dir>/dvae.safetensors` (fp32 weights) + `<dir>/dvae.yaml` (DVAEConfig).

This is the format the trainer exports (its EMA weights), `convert openai-dvae` writes, and
`encode`, `reconstruct` and sampling read. Both files are written to a temporary name first and
renamed, so an interrupted export never leaves a half-written pair behind.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from megadalle.errors import CommandError
from megadalle.config import ConfigError, DVAEConfig
from megadalle.config.coerce import build_dataclass, read_yaml
from megadalle.dvae.model import DiscreteVAE

WEIGHTS = "dvae.safetensors"
CONFIG = "dvae.yaml"
FORMAT = "megadalle-dvae-v1"


def save_dvae(state: dict[str, torch.Tensor] | DiscreteVAE, cfg: DVAEConfig, out_dir: str | Path) -> Path:
    """Write weights + config into `out_dir` (created if needed); returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    tmp_w, tmp_c = out / (WEIGHTS + ".tmp"), out / (CONFIG + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    tmp_c.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    # Weights first: a folder whose yaml exists always has the matching weights.
    tmp_w.replace(out / WEIGHTS)
    tmp_c.replace(out / CONFIG)
    return out


def load_dvae_config(dvae_dir: str | Path) -> DVAEConfig:
    d = Path(dvae_dir)
    if not d.exists():
        raise CommandError(f"dVAE folder {d} does not exist; train one with `megadalle train-dvae` "
                           f"(it exports <run_dir>/dvae/) or import OpenAI's with `megadalle convert openai-dvae`")
    if not d.is_dir():
        raise CommandError(f"{d} is a file; pass the folder holding {WEIGHTS} and {CONFIG}")
    path = d / CONFIG
    if not path.is_file():
        raise CommandError(f"{d} has no {CONFIG}; a dVAE folder holds {WEIGHTS} and {CONFIG} "
                           f"(written by `megadalle train-dvae` or `megadalle convert openai-dvae`)")
    try:
        raw = read_yaml(path, "dVAE config", "the dVAE config as a mapping (n_hid: 256, ...)", empty_ok=False)
    except ConfigError as e:
        raise CommandError(str(e)) from None
    try:
        return build_dataclass(DVAEConfig, raw, "dvae.")
    except ConfigError as e:
        raise CommandError(f"{path}: {e}") from None


def load_dvae(dvae_dir: str | Path, device: str | torch.device = "cpu") -> DiscreteVAE:
    """Rebuild the model from a dVAE folder; errors name the file and what to change."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = load_dvae_config(dvae_dir)
    wpath = Path(dvae_dir) / WEIGHTS
    if not wpath.is_file():
        raise CommandError(f"{Path(dvae_dir)} has {CONFIG} but no {WEIGHTS}")
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CommandError(f"{wpath} is not a readable safetensors file ({e}); re-export it") from None
    model = DiscreteVAE(cfg)
    check_state_matches(model, state, str(wpath))
    model.load_state_dict(state)
    return model.to(device).eval()


def check_state_matches(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a CommandError listing missing/unexpected names and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: file {got[k]} vs config {expected[k]}" for k in sorted(set(got) & set(expected))
             if got[k] != expected[k]]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if missing:
        parts.append(f"{len(missing)} missing tensors (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (first: {', '.join(unexpected[:3])})")
    raise CommandError(f"{source} does not fit its dVAE config: {'; '.join(parts)}. The weights were "
                       f"written for a different n_hid / group_count / n_blk_per_group / vocab_size / n_init; "
                       f"use the {CONFIG} that came with them")
