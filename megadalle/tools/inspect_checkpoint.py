"""`megadalle inspect CKPT`: what a checkpoint holds, without DeepSpeed or a process group.

Prints the step, ranks, ZeRO stage, precision, the files and their sizes, the parameters (count,
shapes and dtypes, from the model states) and the key settings of the stored config.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from megadalle import safe_load
from megadalle.config import Config, ConfigError
from megadalle.training.checkpoint import load_torch, read_meta, resolve_checkpoint, verify_files


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def describe(path: str | Path, show_params: int = 20) -> str:
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    verify_files(ckpt, meta)
    safe_load.check_folder(ckpt)  # refuse by name a file that could run code, before reading any
    lines = [f"checkpoint {ckpt}",
             f"  step {meta.get('step')}, {meta.get('world_size')} ranks, ZeRO-{meta.get('zero_stage')}, "
             f"precision {meta.get('precision')}"]
    state = load_torch(ckpt / "trainer_state.pt") if (ckpt / "trainer_state.pt").is_file() else {}
    if state:
        ema = state.get("ema") or {}
        lines.append(f"  stage {state.get('section')}: {state.get('updates')} updates, {state.get('skipped')} skipped, "
                     f"lr schedule {state.get('schedule')}, EMA "
                     + (f"decay {ema.get('decay')} every {ema.get('every')} ({ema.get('updates')} folds)" if ema else "off"))
    files = meta.get("files", {})
    lines.append(f"  files: {len(files)}, {_size(sum(files.values()))} in all")
    for name, size in sorted(files.items()):
        lines.append(f"    {name:48s} {_size(size):>10s}")
    model_files = sorted(ckpt.glob("*model_states.pt"))
    if model_files:
        blob = load_torch(model_files[0])
        shapes = {}
        for group in blob.get("param_shapes") or []:
            shapes.update(group)
        module = blob.get("module") or {}
        if not shapes:
            shapes = {k: tuple(v.shape) for k, v in module.items()}
        dtypes = Counter(str(v.dtype).replace("torch.", "") for v in module.values() if hasattr(v, "dtype"))
        total = sum(_numel(s) for s in shapes.values())
        lines.append(f"  parameters: {total:,} in {len(shapes)} tensors; stored model dtypes "
                     + (", ".join(f"{k} x{v}" for k, v in dtypes.items()) or "(partitioned: see optimizer shards)"))
        for name, shape in list(shapes.items())[:show_params]:
            lines.append(f"    {name:48s} {tuple(shape)}")
        if len(shapes) > show_params:
            lines.append(f"    ... {len(shapes) - show_params} more (--params N to show more)")
    if (ckpt / "config.yaml").is_file():
        try:
            cfg = Config.load(ckpt / "config.yaml")
            t = cfg.transformer
            lines.append(f"  config: preset {cfg.preset or '(none)'}; transformer dim {t.dim}, depth {t.depth}, "
                         f"heads {t.heads}, text {t.text_len} x {t.text_vocab_size}, image {t.image_grid}^2 x "
                         f"{t.image_vocab_size}; full config in {ckpt / 'config.yaml'}")
        except ConfigError as e:
            lines.append(f"  config.yaml does not load: {e}")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
