"""Consolidate a megadalle checkpoint of any ZeRO stage into one safetensors file plus config.

    megadalle convert zero-to-safetensors <run>/transformer/checkpoints[/step_00001000] --out model.safetensors

writes `model.safetensors` (fp32 weights, the names of the plain model's `state_dict`) and
`model.yaml` (the resolved config stored in the checkpoint) beside it. Name the output
`transformer.safetensors` in a folder to use it with `megadalle sample --ckpt FOLDER`.

ZeRO 1-3: DeepSpeed's `zero_to_fp32` merges the fp32 master partitions of every rank (its own
script, `checkpoints/zero_to_fp32.py`, works on the same folders). ZeRO 0: the model states file
already holds the whole model; in bf16 runs it is the 16-bit copy, so the fp32 master weights are
read from the optimizer state where DeepSpeed keeps them.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import torch

from megadalle import safe_load
from megadalle.errors import CommandError
from megadalle.training.checkpoint import CheckpointError, load_torch, read_meta, resolve_checkpoint, verify_files


def consolidate(path: str | Path) -> tuple[dict[str, torch.Tensor], Path, dict]:
    """(fp32 state dict, the tag folder, its meta) of the checkpoint at `path`."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    verify_files(ckpt, meta)
    safe_load.check_folder(ckpt)  # before DeepSpeed's merger opens any file
    stage = int(meta.get("zero_stage", 0))
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            # DeepSpeed prints progress for every parameter group; keep our output to one summary.
            # zero_to_fp32 passes weights_only=False to torch.load; the context forces weights-only.
            with redirect_stdout(io.StringIO()), safe_load.weights_only_loads():
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types on broken folders
            refusal = safe_load.refusal_from(ckpt, e)
            if refusal is not None:
                raise refusal from None
            raise CheckpointError(f"DeepSpeed could not merge the ZeRO-{stage} shards in {ckpt} "
                                  f"({type(e).__name__}: {e})") from None
    else:
        model_file = ckpt / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise CheckpointError(f"{ckpt} has no {model_file.name}; it is not a complete ZeRO-0 checkpoint")
        blob = load_torch(model_file)
        state = dict(blob["module"])
        if any(t.dtype != torch.float32 for t in state.values() if t.is_floating_point()):
            state = _fp32_masters_stage0(ckpt, blob, state)
    out = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()}
    return out, ckpt, meta


def _fp32_masters_stage0(ckpt: Path, blob: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 master weights of a ZeRO-0 16-bit run: DeepSpeed's optimizer keeps them per group,
    in the order of the parameter names our trainer state records."""
    groups = (blob.get("optimizer") or {}).get("fp32_groups")
    trainer_state = ckpt / "trainer_state.pt"
    names = load_torch(trainer_state).get("optimizer_group_names") if trainer_state.is_file() else None
    if not (isinstance(groups, list) and names and len(groups) == len(names)):
        raise CheckpointError(f"{ckpt}: a 16-bit ZeRO-0 checkpoint without the fp32 master weights or their "
                              f"names; only the 16-bit weights are stored")
    masters = {n: t for g_names, g in zip(names, groups) for n, t in zip(g_names, g)}
    if set(masters) != set(state) or any(masters[k].shape != state[k].shape for k in state):
        raise CheckpointError(f"{ckpt}: the fp32 master weights do not match the model's parameters")
    return masters


def write(state: dict[str, torch.Tensor], ckpt: Path, meta: dict, out: str | Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CommandError(f"--out {out}: name the output file *.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"step": str(meta.get("step")), "zero_stage": str(meta.get("zero_stage")),
                                         "source": str(ckpt)})
    tmp.replace(out)
    cfg_out = out.with_suffix(".yaml")
    cfg_src = ckpt / "config.yaml"
    if cfg_src.is_file():
        cfg_out.write_text(cfg_src.read_text(encoding="utf-8"), encoding="utf-8")
    else:
        cfg_out.write_text(json.dumps(meta), encoding="utf-8")
    return out, cfg_out
