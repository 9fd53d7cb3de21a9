"""The DeepSpeed JSON, generated from the typed config (never templated by hand).

`build_ds_config(cfg, train, world_size)` is the one place that turns a `Config` and one of its
`TrainConfig`s into DeepSpeed's dict. A hand-written JSON (`megadalle train --deepspeed_config
FILE`) is merged on top by `merge_user_config`: keys the typed config also decides must agree
(a disagreement is a `ConfigError` naming both sides), keys only DeepSpeed knows (bucket sizes,
prefetch, ...) are taken as given. The optimizer and LR schedule are built in Python from the typed
config, so a JSON `optimizer` or `scheduler` section would configure them twice: an error.

`ds_configs/*.json` are examples written by `write_examples` (`python -m
megadalle.distributed.ds_config ds_configs/`) and checked against the generator by the tests.
Examples leave out `train_batch_size` so that they are valid for any number of ranks: DeepSpeed
derives it from micro batch x accumulation x ranks.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megadalle.config import Config, ConfigError, TrainConfig, load_config

# A step count DeepSpeed never reaches: we print our own progress.
_NEVER = 2**31 - 1


def build_ds_config(cfg: Config, train: TrainConfig, world_size: int | None) -> dict[str, Any]:
    """DeepSpeed's config for `train` under `cfg`; `world_size=None` leaves the global batch to DeepSpeed."""
    prec = cfg.precision
    dist = cfg.distributed
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
    }
    if world_size is not None:
        out["train_batch_size"] = train.global_batch(world_size)
    out["gradient_clipping"] = float(train.optimizer.grad_clip)
    zero: dict[str, Any] = {"stage": dist.zero_stage}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if dist.zero_stage == 3:
        # Our own exporter consolidates shards (tools/zero_to_safetensors); gathering a 16-bit
        # copy on every save would only cost time and memory.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if dist.scheme == "paper":
        # DeepSpeed's ZeRO-3 step copies one optimizer sub-group's gradients at a time
        # (stage3._prepare_fp32_grad_for_sub_group): at its default 1e9 elements that is 1.9 GiB
        # per GPU at 12B in bf16, at 1e8 0.19 GiB, for a few more, smaller optimizer calls.
        zero["sub_group_size"] = 10 ** 8
    out["zero_optimization"] = zero
    out["bf16"] = {"enabled": prec.mode == "bf16"}
    if prec.bf16_state:  # no fp32 master copy: weights, gradients and Adam moments in bf16
        out["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    # fp16_per_resblock leaves DeepSpeed in fp32: the residual stream, gains, biases, embeddings
    # and logits stay fp32 as in the paper, and each resblock's branch computes in fp16 under its
    # own gradient scale (distributed/resblock_scaling.py). A DeepSpeed fp16 engine would cast
    # the whole model to fp16 and add a global scale on top.
    fp16: dict[str, Any] = {"enabled": prec.mode == "fp16"}
    if prec.mode == "fp16":
        fp16.update(loss_scale=0, initial_scale_power=prec.fp16_initial_scale_power,
                    loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    out["fp16"] = fp16
    # Optimizer offload with torch's CPU AdamW (impl=auto) is allowed; DeepSpeed otherwise insists
    # on its compiled DeepSpeedCPUAdam (engine.build_optimizer picks it for impl=deepspeed).
    if dist.offload_optimizer:
        out["zero_force_ds_cpu_optimizer"] = False
    out["steps_per_print"] = _NEVER
    out["wall_clock_breakdown"] = False
    return out


@dataclass(frozen=True)
class StateBytes:
    """Bytes per element of what DeepSpeed's ZeRO-3 optimizer keeps for each parameter partition."""

    weights: int  # the model's (16-bit in bf16/fp16) partition
    master: int  # the optimizer's copy (fp32, or bf16 with bf16_master_weights_and_grads)
    grads: int  # grad_partitions_flat_buffer (the model's dtype unless data_types.grad_accum_dtype)
    moments: int  # Adam's m and v together


def zero3_state_bytes(ds: dict[str, Any]) -> StateBytes:
    """What `deepspeed.initialize` with this dict holds, read off the dict itself, so that `megadalle
    plan` predicts the configured run and not a formula kept beside it. Measured on DeepSpeed 0.19
    (test_paper_powersgd.py): the master copy is a tensor of its own even when its dtype equals the
    model's (stage3.py means to share it when the devices match, but compares a torch.device with
    a string, which is never equal)."""
    low = 2 if ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled") else 4
    bf16 = ds.get("bf16", {})
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    return StateBytes(weights=low, master=2 if bf16.get("bf16_master_weights_and_grads") else 4,
                      grads={"fp32": 4, "bf16": 2, "fp16": 2}.get(accum, low),
                      moments=4 if bf16.get("bf16_optimizer_states") else 8)


# Keys of DeepSpeed's JSON that the typed config decides: path -> typed name (for messages).
_TYPED_KEYS: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "{t}.global_batch_size (= micro_batch_size x grad_accum_steps x ranks)",
    ("train_micro_batch_size_per_gpu",): "{t}.micro_batch_size",
    ("gradient_accumulation_steps",): "{t}.grad_accum_steps",
    ("gradient_clipping",): "{t}.optimizer.grad_clip",
    ("zero_optimization", "stage"): "distributed.zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "distributed.offload_optimizer",
    ("bf16", "enabled"): "precision.mode",
    ("bf16", "bf16_master_weights_and_grads"): "precision.bf16_state",
    ("bf16", "bf16_optimizer_states"): "precision.bf16_state",
    ("fp16", "enabled"): "precision.mode",
    ("fp16", "loss_scale"): "precision.mode / precision.fp16_initial_scale_power",
    ("fp16", "initial_scale_power"): "precision.fp16_initial_scale_power",
}
# Where the typed config leaves a key out, the value it means.
_TYPED_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("zero_optimization", "offload_optimizer", "device"): "none",
    ("bf16", "bf16_master_weights_and_grads"): False,
    ("bf16", "bf16_optimizer_states"): False,
}


def _get(d: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    cur: Any = d
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return False, None
        cur = cur[p]
    return True, cur


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b) and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def merge_user_config(generated: dict[str, Any], user: dict[str, Any], source: str = "the DeepSpeed JSON",
                      section: str = "train") -> dict[str, Any]:
    """`generated` with the extra keys of a hand-written `user` config; disagreements are errors."""
    if not isinstance(user, dict):
        raise ConfigError(f"{source} must hold a JSON object, not {type(user).__name__}")
    for key in ("optimizer", "scheduler"):
        if key in user:
            typed = f"{section}.optimizer" if key == "optimizer" else f"{section}.schedule"
            raise ConfigError(
                f"{source} has an '{key}' section, but the {key} is built from the typed config "
                f"({typed}); giving it twice is ambiguous. Remove '{key}' from {source} and set {typed}.* instead")
    conflicts = []
    for path, typed_name in _TYPED_KEYS.items():
        has_user, uval = _get(user, path)
        if not has_user:
            continue
        if uval == "auto":
            conflicts.append(f"{'.'.join(path)}='auto' (write the value; it comes from {typed_name.format(t=section)})")
            continue
        has_gen, gval = _get(generated, path)
        if not has_gen:
            if path not in _TYPED_DEFAULTS:
                continue
            gval = _TYPED_DEFAULTS[path]
        if not _same(uval, gval):
            conflicts.append(f"{'.'.join(path)}={uval!r} but the typed config gives {gval!r} "
                             f"(from {typed_name.format(t=section)})")
    if conflicts:
        raise ConfigError(f"{source} disagrees with the typed config: " + "; ".join(conflicts)
                          + ". Change the JSON or the config so that they agree (or drop the key from the JSON)")
    merged = copy.deepcopy(generated)
    _deep_update(merged, user)
    return merged


def load_user_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object, not {type(data).__name__}")
    return data


# The checked-in examples: file name -> overrides on the tiny preset (stage-2 `train` section).
EXAMPLES: dict[str, dict[str, Any]] = {
    "zero0_fp32.json": {"distributed.zero_stage": 0, "precision.mode": "fp32"},
    "zero0_bf16.json": {"distributed.zero_stage": 0, "precision.mode": "bf16"},
    "zero1_bf16.json": {"distributed.zero_stage": 1, "precision.mode": "bf16"},
    "zero2_bf16.json": {"distributed.zero_stage": 2, "precision.mode": "bf16"},
    "zero2_fp16.json": {"distributed.zero_stage": 2, "precision.mode": "fp16"},
    "zero3_bf16.json": {"distributed.zero_stage": 3, "precision.mode": "bf16"},
    "zero3_bf16_offload.json": {"distributed.zero_stage": 3, "precision.mode": "bf16",
                                "distributed.offload_optimizer": True},
    "zero2_fp16_per_resblock.json": {"distributed.zero_stage": 2, "precision.mode": "fp16_per_resblock"},
}


def example_config(name: str) -> Config:
    return load_config("tiny", None, EXAMPLES[name])


def write_examples(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in EXAMPLES:
        cfg = example_config(name)
        path = folder / name
        path.write_text(json.dumps(build_ds_config(cfg, cfg.train, None), indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_examples(sys.argv[1] if len(sys.argv) > 1 else "ds_configs"):
        print(p)
