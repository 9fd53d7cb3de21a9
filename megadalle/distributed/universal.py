"""DeepSpeed's universal checkpoint, for resuming on another number of ranks or ZeRO stage
(training/elastic.py decides when; this module does DeepSpeed's part).

`convert(ckpt, out)` runs DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) with
every file read weights-only, then bridges the gaps between that converter and DeepSpeed 0.19's
loaders. Only metadata and file forms are touched: DeepSpeed reshards the tensors.
  1. The ZeRO-1/2 and the ZeRO-3 loaders read different layouts of `zero/optimizer_state.pt`
     (top-level `param_groups` and `ds_version`, vs. a nested `optimizer_state_dict` holding the
     step); the converted file gets both.
  2. The model-states file is named per stage (`mp_rank_00_model_states.pt` vs.
     `zero_pp_rank_0_mp_rank_00_model_states.pt`); the converted folder gets both names.
  3. The ZeRO-3 loader copies the first parameter group's hyperparameters onto every group (the
     weight decay onto the no-decay group), and
  4. it gives every group's Adam state one shared step tensor, which torch's Adam then advances
     once per group: a wrong bias correction from the next step on (1.2% off the loss three steps
     later). `repair_after_universal_load` puts back each group's own settings and step.
  5. A ZeRO-3 conversion writes each state as a flat tensor and keeps the step only in the global
     file; the ZeRO-1/2 loader reads {"param": tensor of the parameter's shape} and a step file per
     parameter. The converted folder gets that form, which both loaders read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megadalle import safe_load
from megadalle.errors import CommandError

MODEL_FILE_STAGE012 = "mp_rank_00_model_states.pt"
MODEL_FILE_STAGE3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"


def convert(ckpt: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of `ckpt` in `out` (rank 0 only; `out` must not exist),
    readable by a ZeRO-1, -2 or -3 engine with `checkpoint.load_universal`."""
    from types import SimpleNamespace

    import torch
    from deepspeed.checkpoint import ds_to_universal

    # The converter's command-line options, as its main() reads them.
    args = SimpleNamespace(input_folder=str(ckpt), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    safe_load.check_folder(ckpt)
    try:
        with safe_load.weights_only_loads():
            ds_to_universal.main(args)
    except Exception as e:  # noqa: BLE001 - DeepSpeed's converter raises many types
        shutil.rmtree(out, ignore_errors=True)
        raise CommandError(f"DeepSpeed could not convert {ckpt} to a universal checkpoint ({type(e).__name__}: "
                           f"{e}); resume with the ranks and ZeRO stage it was written with") from None
    # Gap 1: one global optimizer file that both loaders read.
    state_file = out / "zero" / "optimizer_state.pt"
    state = safe_load.load_file(state_file)
    inner = state.get("optimizer_state_dict")
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in (state.get("param_groups") or (inner or {}).get("param_groups") or [])]
    step = ((inner or {}).get("state") or {}).get(0, {}).get("step")
    step = step if step is not None else _first_step(out / "zero")
    state["param_groups"] = groups
    state.setdefault("ds_version", _deepspeed_version())
    state["optimizer_state_dict"] = {**(inner or {}), "state": {0: {"step": step}}, "param_groups": groups}
    torch.save(state, state_file)
    _one_file_form(out, step)
    # Gap 2: the model-states file under both stages' names.
    for have, want in ((MODEL_FILE_STAGE012, MODEL_FILE_STAGE3), (MODEL_FILE_STAGE3, MODEL_FILE_STAGE012)):
        if (out / have).is_file() and not (out / want).is_file():
            shutil.copy2(out / have, out / want)


def _one_file_form(out: Path, step: Any) -> None:
    """Gap 5 (module docstring)."""
    import torch

    model_file = out / MODEL_FILE_STAGE3
    if not model_file.is_file():
        return  # a ZeRO-1/2 conversion is already in this form
    shapes: dict[str, Any] = {}
    for group in safe_load.load_file(model_file).get("param_shapes") or []:
        shapes.update(group)
    for folder in (out / "zero").iterdir():
        if folder.name not in shapes:
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = folder / f"{key}.pt"
            value = safe_load.load_file(f) if f.is_file() else None
            if isinstance(value, torch.Tensor):
                torch.save({"param": value.view(shapes[folder.name])}, f)
        if not (folder / "step.pt").is_file():
            torch.save(step, folder / "step.pt")


def _first_step(zero: Path) -> Any:
    for param in sorted(p for p in zero.iterdir() if p.is_dir()):
        if (param / "step.pt").is_file():
            return safe_load.load_file(param / "step.pt")
    raise CommandError(f"the universal checkpoint in {zero} has no optimizer step; the source checkpoint was "
                       f"saved before any optimizer step")


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def group_hyperparameters(engine: Any) -> list[dict[str, Any]]:
    """Each optimizer group's settings but its parameters (taken before a universal load)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in _torch_optimizer(engine).param_groups]


def repair_after_universal_load(engine: Any, saved: list[dict[str, Any]]) -> None:
    """Gaps 3 and 4 (module docstring), after `engine.load_checkpoint` of a universal checkpoint;
    `saved` is `group_hyperparameters(engine)` taken before it."""
    opt = _torch_optimizer(engine)
    for group, own in zip(opt.param_groups, saved):
        group.update(own)
    for state in opt.state.values():
        if hasattr(state.get("step"), "clone"):
            state["step"] = state["step"].clone()


def _torch_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)
