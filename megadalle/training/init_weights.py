"""Starting a run from exported weights (`--init-from DIR`, `checkpoint.init_from`): fine-tuning.

The Trainer copies the weights into the plain model before DeepSpeed wraps it, so ZeRO-3
partitions the loaded values and every rank starts from the same point; the optimizer, the LR
schedule, the step count, the data position and the EMA start fresh (the EMA from the loaded
weights). A stage folder that already holds a checkpoint resumes from it instead: an interrupted
fine-tune must continue, not start over.

DIR is an export (`megadalle export RUN --out DIR`), a run folder, or one stage folder of it:
whichever holds `<stage>/<name>.safetensors` or `<name>.safetensors` (the EMA export a trainer
writes at the end). Only safetensors are read, never a pickle, so nothing in the file can run;
tensors are copied one at a time, since at 12B a second full copy beside the model does not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from megadalle.config import Config
from megadalle.errors import CommandError
from megadalle.run_layout import RunLayout


def find_weights(source: str | Path, stage: str, name: str) -> Path:
    """The `<name>.safetensors` that `source` (an export, run or stage folder) holds for `stage`."""
    root = Path(source)
    if not root.is_dir():
        raise CommandError(f"--init-from {root}: no such folder; give a folder written by `megadalle export RUN "
                           f"--out DIR`, a run folder, or its {stage}/ folder")
    nested, direct = RunLayout(root).stage(stage) / f"{name}.safetensors", root / f"{name}.safetensors"
    for path in (nested, direct):
        if path.is_file():
            return path
    raise CommandError(f"--init-from {root} holds no {stage} weights: expected {nested} (an export, or a run "
                       f"whose {stage} training finished) or {direct}")


def check_same_tokenizer(weights: Path, run_tokenizer: Path) -> None:
    """The tokenizer saved with the weights (an export's or a run's tokenizer.json) must be the run's:
    another BPE of the same size gives other ids to the same words, and nothing else would notice."""
    theirs = RunLayout(weights.parent.parent).tokenizer
    if not theirs.is_file() or theirs.resolve() == run_tokenizer.resolve():
        return
    if not run_tokenizer.is_file():
        raise CommandError(f"this run has no tokenizer at {run_tokenizer}; fine-tune with the one the weights in "
                           f"{weights} were trained with: --tokenizer.path {theirs}")
    if theirs.read_bytes() != run_tokenizer.read_bytes():
        raise CommandError(f"the weights in {weights} were trained with the tokenizer {theirs}, and this run "
                           f"tokenizes with another one ({run_tokenizer}); pass --tokenizer.path {theirs}")


def load_weights(model: nn.Module, path: Path, hint: Callable[[], str]) -> None:
    """Copy the tensors of `path` into `model` in place. The file must hold every parameter with
    its shape (buffers it lacks keep their values); otherwise the message names the first
    mismatch and adds `hint()` (which settings the weights were trained with)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            problem = _mismatch(model, shapes)
            if problem:
                raise CommandError(f"{path} does not fit the model this run configures: {problem}. {hint()}")
            targets = dict(model.named_parameters()) | dict(model.named_buffers())
            with torch.no_grad():
                for k in shapes:
                    targets[k].copy_(f.get_tensor(k))
    except CommandError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise CommandError(f"{path} is not a readable safetensors file ({e}); export the weights again") from None


def _mismatch(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str:
    """'' when `shapes` (name -> shape in the file) fits the model, else what does not."""
    params = {k: tuple(p.shape) for k, p in model.named_parameters()}
    expected = params | {k: tuple(b.shape) for k, b in model.named_buffers()}
    wrong = [(k, shapes[k], expected[k]) for k in shapes if k in expected and shapes[k] != expected[k]]
    missing = [k for k in params if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    parts = []
    if wrong:
        k, theirs, ours = wrong[0]
        parts.append(f"parameter {k} has shape {list(theirs)} in the file and {list(ours)} in the model"
                     + (f" ({len(wrong) - 1} more shapes differ)" if len(wrong) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} parameters are missing from the file (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors of the file are not in the model (first: {', '.join(unexpected[:3])})")
    return "; ".join(parts)


def settings_hint(weights: Path, cfg: Config, settings_of: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """What to change: the settings (and preset) in the yaml beside `weights` that differ from `cfg`'s.
    `settings_of` turns that yaml into dotted settings (Trainer.export_settings)."""
    import yaml

    path = weights.with_suffix(".yaml")
    try:
        exported = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        exported = None
    if not isinstance(exported, dict):
        return "Use the settings the weights were trained with"
    current: dict[str, Any] = {"preset": cfg.preset}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            current.update({f"{section}.{k}": v for k, v in values.items()})
    flags = [f"--{k} {v}" for k, v in settings_of(exported).items() if k in current and current[k] != v]
    if not flags:
        return f"Use the settings the weights were trained with ({path})"
    more = f" (and {len(flags) - 8} more, see {path})" if len(flags) > 8 else ""
    return f"They were trained with {' '.join(flags[:8])}{more}: start the fine-tune with those settings"
