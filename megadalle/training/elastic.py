"""Elastic resume: continue a run from a checkpoint written by another number of ranks or at
another ZeRO stage (`--resume latest` notices and converts; issue 19).

What is carried over, and how:

- **DeepSpeed's model and optimizer state** through DeepSpeed's own universal checkpoint: rank 0
  converts the checkpoint (`distributed/universal.py`, every file read weights-only) into a
  temporary folder beside it, every rank loads that with `checkpoint.load_universal`, and the
  folder is removed. The tensors are resharded by DeepSpeed; universal.py bridges five gaps
  between DeepSpeed 0.19's converter and its loaders, each found by a test that failed.
  ZeRO-0 writes no ZeRO files: at stage 0 every rank holds everything, so only the number of ranks
  may change there; stage 0 <-> 1-3 is refused (export the weights and use --init-from).
- **the data position** must be global: the stream's `state_dict()` the same on every rank and
  loadable at any number of ranks with the same global batch (the stream says so with
  `elastic = True`). Streams whose position is per rank are refused with the reason.
- **the EMA**: a sharded EMA (ZeRO-3) is rebuilt from every old rank's partitions and cut again
  for the new layout; a whole one is cut or kept as before.
- **RNG states** are per rank and cannot be split or merged: each rank keeps the seeds a fresh run
  would use. Every random draw megadalle makes per sample (BPE and caption dropout, Gumbel noise,
  augmentation) comes from the sample, so only model dropout (0 in every preset) would notice.
- **refused**: a gradient hook whose state is tied to the rank count: PowerSGD's error buffers
  (per local index) and per-resblock fp16 scales (they carry the factor M of the ranks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megadalle.errors import CommandError

def describe_change(meta: dict[str, Any], world: int, zero_stage: int) -> str:
    """"" when the checkpoint's topology is this run's, else what changed (for the log)."""
    changes = []
    if meta.get("world_size") != world:
        changes.append(f"{meta.get('world_size')} -> {world} ranks")
    if meta.get("zero_stage") != zero_stage:
        changes.append(f"ZeRO-{meta.get('zero_stage')} -> ZeRO-{zero_stage}")
    return ", ".join(changes)


def needs_universal(ckpt: Path, world: int, zero_stage: int) -> bool:
    """Whether resuming `ckpt` here goes through a universal checkpoint: the topology changed and
    DeepSpeed wrote ZeRO files (every ZeRO stage but fp32 stage 0, whose files hold everything)."""
    from megadalle.training.checkpoint import read_meta

    return bool(describe_change(read_meta(ckpt), world, zero_stage)) and any(ckpt.glob("*_optim_states.pt"))


def sharded_ema_files(ckpt: Path, shapes: dict[str, tuple[int, ...]]) -> list[Path]:
    """The rank files that hold one copy of every partition of a sharded EMA, in partition order.

    ZeRO-3 cut each parameter over the ranks it shards over: all ranks, or (distributed.scheme=paper)
    the L ranks of a machine, which hold the same partitions on every machine: ranks 0..L-1. L is
    read off the partitions themselves: the largest parameter has ceil(numel / L) per rank."""
    import math

    from megadalle.training.checkpoint import load_torch, read_meta

    first = load_torch(ckpt / "rank_00000.pt")["ema"]["params"]
    name = max(shapes, key=lambda n: math.prod(shapes[n]))
    count = math.ceil(math.prod(shapes[name]) / first[name].numel())
    world = int(read_meta(ckpt)["world_size"])
    if world % count:
        raise CommandError(f"the sharded EMA in {ckpt} is cut {count} ways, which does not divide its "
                           f"{world} ranks; the checkpoint is damaged")
    return [ckpt / f"rank_{r:05d}.pt" for r in range(count)]


def refusal(meta: dict[str, Any], zero_stage: int, hook_names: list[str], data_elastic: bool, ckpt: Path) -> str:
    """Why this topology change cannot be resumed ("" when it can)."""
    was = f"written by {meta.get('world_size')} ranks at ZeRO-{meta.get('zero_stage')}"
    same = (f"resume with {meta.get('world_size')} ranks and --distributed.zero_stage={meta.get('zero_stage')}, "
            f"or start from its weights (megadalle convert zero-to-safetensors, then --init-from)")
    if (meta.get("zero_stage") == 0) != (zero_stage == 0):
        return (f"checkpoint {ckpt} was {was}; moving between ZeRO-0 and ZeRO 1-3 is not supported (ZeRO-0 "
                f"writes no ZeRO files for DeepSpeed's universal checkpoint to convert): {same}")
    if hook_names:
        return (f"checkpoint {ckpt} was {was}; this run's gradient hooks ({', '.join(hook_names)}) keep state "
                f"tied to the number of ranks (PowerSGD error buffers per local index, per-resblock fp16 "
                f"scales carrying the rank count): {same}")
    if not data_elastic:
        return (f"checkpoint {ckpt} was {was}; this run's data position is kept per rank (a stream of "
                f"per-rank slots), so another number of ranks would see other samples: {same}")
    return ""


def rebuild_sharded(parts: list[dict[str, Any]], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Full tensors from the flat partitions every old rank kept, in rank order (ZeRO-3 cuts a
    parameter's flattened elements into equal contiguous pieces, padding the last)."""
    import math

    import torch

    out = {}
    for name, shape in shapes.items():
        flat = torch.cat([p[name].reshape(-1).float() for p in parts])
        out[name] = flat[: math.prod(shape)].view(shape)
    return out
