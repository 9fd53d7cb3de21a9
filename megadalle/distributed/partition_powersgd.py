"""PowerSGD between machines on DeepSpeed's ZeRO-3 gradient partitions: the compressed half of
the paper's scheme (distributed.scheme=paper with distributed.powersgd.enabled=true).

Where the gradients are
-----------------------
ZeRO-3 shards over the machine's L ranks (replicas.py). After the last micro-batch's backward,
rank l of every machine holds, in `optimizer.grad_partitions_flat_buffer`, partition l of every
parameter's gradient already averaged over its machine (DeepSpeed's reduce-scatter): for each
parameter in the order of `optimizer.fp16_groups`, `ceil(numel / L)` consecutive elements of the
flattened (row-major) tensor, starting at l * ceil(numel / L), the last partition zero-padded.
Rank l of machine m and rank l of machine m' hold the same elements of different gradients:
those are what cross machines, over the group of ranks with local index l (`groups.inter`).

How a partition becomes a matrix
--------------------------------
A weight [rows, C] (C = the product of the other dims) whose partition starts and ends on row
boundaries is the block of R = valid / C whole rows. PowerSGD sends (a + b) s numbers for an
a x b view at rank s, least for a square view, and DeepSpeed's flat row-major cut makes strips:
at 12B the MLP's output matrix [d, 4d] gives 496 x 15872 partitions, where rank 112 would send
23% of the numbers instead of 8.5% for a square view. So each partition is viewed, without a
copy, as the squarest of [R k, C / k] (each row cut into k pieces, k dividing C) and
[R / k, C k] (k consecutive rows joined, k dividing R), the natural [R, C] on ties. Cutting or
joining rows can at most multiply the gradient's rank by k; what a round leaves out stays in the
error buffer and is sent by later rounds (the loss test bounds the cost). A partition that does
not fall on row boundaries (a shape the machine's L does not divide) is sent uncompressed, and
`describe()` says how many.

Compressed: every partition of a >= 2-D weight that is not an embedding or an unembedding
(powersgd.is_plain), viewed as above, at the per-GPU rank s = ceil(r / L) (powersgd.shard_rank),
where compressing saves bytes ((a + b) s < a b). Everything else (embeddings, unembeddings,
gains, biases, DeepSpeed's padding) goes through one fp32 all-reduce across machines, / M.

Why the hook is sound
---------------------
It runs between the last `engine.backward()` and `engine.step()` (the trainer's gradient hook),
and `engine.step()` reads only the buffer it leaves: DeepSpeed's overflow check, its
gradient-norm all-reduce over the machine, the clipping and the loss-scale update all see the
compressed average, identical on every machine (P and Q' are all-reduced sums, so every machine
decompresses the same U = P Q'^T / M). Before anything is added to an error buffer, one MAX
all-reduce over the machine and one across machines agree whether any rank's partition holds an
inf or NaN; if so the hook returns False on every rank, the trainer skips the step
(distributed.engine.skip_step), and parameters, Adam moments and error buffers stay bit-identical.
That check is also why the error buffers are kept apart from DeepSpeed's gradient buffer: an inf
added into E could not be taken out again. precision.mode=fp16 is refused at start-up (config):
DeepSpeed's global loss scaler would never hear of a skipped step.

Error buffers: one per compressed partition, in `powersgd.error_dtype` (16-bit by default in this
scheme, as the paper). Checkpoints store them as the sum over machines, once per local index;
resume divides by the number of machines (powersgd.ErrorFeedbackState).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from megadalle.config import Config, ConfigError
from megadalle.distributed.comm import Comm
from megadalle.distributed.groups import TwoLevelGroups
from megadalle.distributed.powersgd import (
    ErrorFeedbackState, default_rank, draw_q, error_dtype, is_plain, low_rank_round, shard_rank)


@dataclass(frozen=True)
class ParamSlot:
    """One parameter's partition in this rank's flat gradient buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # where its partition starts in the flat buffer
    partition_numel: int  # ceil(numel / L): DeepSpeed pads the last partition
    plain: bool  # never compressed (embedding, unembedding, gain, bias)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PartitionShard:
    """A compressed partition: buffer[offset : offset + rows * cols] viewed as [rows, cols]."""

    param_index: int  # into the slot list: Q's seed, the same on every machine
    name: str
    offset: int
    error_offset: int  # where its error buffer starts in this rank's flat error buffer
    rows: int
    cols: int
    rank: int


def slots(params: Iterable[tuple[str, tuple[int, ...], bool]], gpus_per_node: int) -> list[ParamSlot]:
    """(name, shape, plain) in DeepSpeed's order -> the slots of every rank's flat buffer."""
    out, offset = [], 0
    for name, shape, plain in params:
        pn = math.ceil(math.prod(shape) / gpus_per_node)
        out.append(ParamSlot(name, tuple(shape), offset, pn, plain))
        offset += pn
    return out


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def matrix_view(shape: tuple[int, ...], gpus_per_node: int, local_index: int) -> tuple[int, int] | None:
    """The [a, b] view of partition `local_index` (module docstring), or None when it holds no
    whole rows."""
    numel, C = math.prod(shape), math.prod(shape[1:])
    pn = math.ceil(numel / gpus_per_node)
    start = local_index * pn
    valid = max(0, min(pn, numel - start))
    if valid == 0 or start % C or valid % C:
        return None
    R = valid // C
    views = [(R * k, C // k) for k in _divisors(C)] + [(R // k, C * k) for k in _divisors(R)]
    return min(views, key=lambda v: (v[0] + v[1], v != (R, C)))


def partition_shards(slot_list: list[ParamSlot], gpus_per_node: int, local_index: int, rank_per_shard: int,
                     compress: bool = True) -> tuple[list[PartitionShard], list[tuple[int, int]], int]:
    """This rank's compressed partitions, the [start, end) ranges sent dense, and the number of
    matrix partitions sent dense because they do not fall on row boundaries."""
    shards: list[PartitionShard] = []
    dense: list[tuple[int, int]] = []
    misaligned, error_offset = 0, 0
    for i, s in enumerate(slot_list):
        view = None if s.plain or not compress else matrix_view(s.shape, gpus_per_node, local_index)
        if not s.plain and compress and view is None and s.numel > local_index * s.partition_numel:
            misaligned += 1
        if view is not None:
            a, b = view
            rank = min(rank_per_shard, a, b)
            if (a + b) * rank < a * b:  # below that PowerSGD only loses accuracy
                shards.append(PartitionShard(i, s.name, s.offset, error_offset, a, b, rank))
                error_offset += a * b
                if a * b < s.partition_numel:  # DeepSpeed's padding (zeros) rides with the dense part
                    dense.append((s.offset + a * b, s.offset + s.partition_numel))
                continue
        dense.append((s.offset, s.offset + s.partition_numel))
    merged: list[tuple[int, int]] = []
    for lo, hi in dense:
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return shards, merged, misaligned


def param_specs(module: Any, params: list[Any], uncompressed: list[str]) -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, full shape, plain) of `params` (ZeRO-3's placeholders carry the shape in ds_shape)."""
    from torch import nn

    names = {id(p): n for n, p in module.named_parameters()}
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    out = []
    for p in params:
        shape = tuple(getattr(p, "ds_shape", p.shape))
        out.append((names[id(p)], shape, is_plain(names[id(p)], len(shape), id(p) in embeddings, uncompressed)))
    return out


def optimizer_slots(engine: Any, uncompressed: list[str]) -> list[ParamSlot]:
    """The slots of the engine's ZeRO-3 optimizer (its flat gradient buffer's layout)."""
    import torch.distributed as dist

    params = list(itertools.chain.from_iterable(engine.optimizer.fp16_groups))
    L = dist.get_world_size(group=engine.optimizer.dp_process_group)
    out = slots(param_specs(engine.module, params, uncompressed), L)
    for s, p in zip(out, params):  # our reading of DeepSpeed's layout, checked once
        if s.partition_numel != p.partition_numel():
            raise ConfigError(f"DeepSpeed's ZeRO-3 partition of {s.name} has {p.partition_numel()} elements, "
                              f"megadalle expected {s.partition_numel}: this DeepSpeed lays out its gradient "
                              f"buffer differently; use distributed.powersgd.enabled=false with it")
    total = engine.optimizer.grad_partitions_flat_buffer.numel()
    if sum(s.partition_numel for s in out) != total:
        raise ConfigError(f"DeepSpeed's ZeRO-3 gradient buffer has {total} elements, megadalle's layout "
                          f"{sum(s.partition_numel for s in out)}; use distributed.powersgd.enabled=false with it")
    return out


class PartitionPowerSGD(ErrorFeedbackState):
    """The gradient hook of the compressed paper scheme (see the module docstring)."""

    def __init__(self, engine: Any, groups: TwoLevelGroups, cfg: Config) -> None:
        pcfg = cfg.distributed.powersgd
        self.engine, self.comm = engine, Comm(groups)
        self.L, self.M, self.loc = groups.gpus_per_node, groups.machines, groups.local_index
        self.rank = pcfg.rank or default_rank(cfg.transformer.dim)
        self.rank_per_shard = shard_rank(self.rank, self.L)
        self.compressing = self.M > 1  # one machine: nothing crosses a network
        self.eps, self.steps, self.skipped = pcfg.orth_eps, 0, 0
        self.slots = optimizer_slots(engine, list(pcfg.uncompressed))
        self.shards, self.dense, self.misaligned = partition_shards(self.slots, self.L, self.loc,
                                                                    self.rank_per_shard, self.compressing)
        buffer = engine.optimizer.grad_partitions_flat_buffer
        self.device = buffer.device
        self.error = torch.zeros(sum(sh.rows * sh.cols for sh in self.shards), device=self.device,
                                 dtype=error_dtype(cfg.distributed))  # this rank's E, all its partitions
        self._q = [draw_q(pcfg.seed, sh.param_index, self.loc, sh.cols, sh.rank, self.device) for sh in self.shards]

    def describe(self) -> str:
        n = sum(sh.rows * sh.cols for sh in self.shards)
        sent = sum((sh.rows + sh.cols) * sh.rank for sh in self.shards)
        return (f"PowerSGD between {self.M} machines on ZeRO-3 partitions: {len(self.shards)} matrix partitions "
                f"({n:,} numbers) at rank {self.rank_per_shard} per GPU -> {sent / max(n, 1):.1%} of their "
                f"numbers sent; {self.misaligned} matrix partitions sent uncompressed (not on row boundaries); "
                f"error buffers {self.error.dtype}")

    def _views(self, flat: torch.Tensor, offset_of: Any) -> list[torch.Tensor]:
        return [flat[offset_of(sh):offset_of(sh) + sh.rows * sh.cols].view(sh.rows, sh.cols) for sh in self.shards]

    @torch.no_grad()
    def after_backward(self, model: Any = None) -> bool:
        buffer = self.engine.optimizer.grad_partitions_flat_buffer  # (this rank's partition elements,)
        if self.comm.any_everywhere(not bool(torch.isfinite(buffer).all()), "nonfinite", self.device):
            self.skipped += 1
            return False  # nothing added to E: the step is skipped everywhere (trainer)
        if not self.compressing:
            self.steps += 1
            return True
        if self.shards:
            grads = self._views(buffer, lambda sh: sh.offset)  # (a, b) each, the machine's mean
            errors = self._views(self.error, lambda sh: sh.error_offset)
            for e, g in zip(errors, grads):
                e.add_(g)  # E += G
            for g, update in zip(grads, low_rank_round(errors, self._q, self.comm, self.M, self.eps)):
                g.copy_(update)
        if self.dense:
            flat = torch.cat([buffer[lo:hi] for lo, hi in self.dense]).float()  # one fp32 all-reduce
            self.comm.all_reduce(flat, "inter", "dense")
            flat.div_(self.M)
            offset = 0
            for lo, hi in self.dense:
                buffer[lo:hi].copy_(flat[offset:offset + hi - lo])
                offset += hi - lo
        self.steps += 1
        return True

    def metrics(self) -> dict[str, float]:
        """Mean bytes per exchanged step this rank put on the inter-machine wire: matrices and the rest."""
        steps = max(1, self.steps)
        return {"powersgd_matrix_bytes": self.comm.bytes("inter", "powersgd") / steps,
                "powersgd_dense_bytes": self.comm.bytes("inter", "dense") / steps,
                "matrix_numel": float(self.error.numel())}

    def _signature(self) -> list[list[Any]]:
        return [[sh.name, sh.rows, sh.cols] for sh in self.shards]
