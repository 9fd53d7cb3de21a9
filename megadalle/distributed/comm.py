"""The one door through which megadalle's gradient collectives pass, counting what they move.

Every collective of the gradient exchange goes through a `Comm`, which records per level
("intra": inside a machine, "inter": between machines, "world") and per tag (what was sent, e.g.
"powersgd.p") the number of calls, the payload (bytes of the tensor handed in) and the bytes each
rank puts on the wire under the ring algorithm that NCCL and gloo use for large tensors:

    all-reduce      2 (n-1)/n * S        reduce-scatter  (n-1)/n * S_in
    all-gather      (n-1)/n * S_out      broadcast       S (root sends, the others receive)

so that a compression claim is measured from the calls actually made, not computed. A group of one
rank moves nothing and is not called at all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megadalle.distributed.groups import TwoLevelGroups

LEVELS = ("intra", "inter", "world")
# torch 2.13 renamed the flat-tensor collectives; older releases (pyproject allows >= 2.5) have only
# the *_tensor names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class Traffic:
    calls: int = 0
    payload_bytes: int = 0
    wire_bytes: float = 0.0


@dataclass
class Comm:
    groups: TwoLevelGroups
    traffic: dict[tuple[str, str], Traffic] = field(default_factory=lambda: defaultdict(Traffic))

    # ---- groups ----
    def _group(self, level: str):
        if level == "intra":
            return self.groups.intra, self.groups.gpus_per_node
        if level == "inter":
            return self.groups.inter, self.groups.machines
        if level == "world":
            return None, self.groups.world_size
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    def size(self, level: str) -> int:
        return self._group(level)[1]

    def _count(self, level: str, tag: str, payload: int, wire: float) -> None:
        t = self.traffic[(level, tag)]
        t.calls += 1
        t.payload_bytes += payload
        t.wire_bytes += wire

    # ---- collectives ----
    def all_reduce(self, tensor: torch.Tensor, level: str, tag: str, op: str = "sum") -> torch.Tensor:
        group, n = self._group(level)
        if n > 1:
            s = tensor.numel() * tensor.element_size()
            self._count(level, tag, s, 2 * (n - 1) / n * s)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return tensor

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, level: str, tag: str) -> torch.Tensor:
        """Sum `input` (n equal chunks, flat) over the group; chunk i lands on the group's rank i."""
        group, n = self._group(level)
        if n == 1:
            output.copy_(input)
            return output
        s = input.numel() * input.element_size()
        self._count(level, tag, s, (n - 1) / n * s)
        _reduce_scatter(output, input, group=group)
        return output

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, level: str, tag: str) -> torch.Tensor:
        group, n = self._group(level)
        if n == 1:
            output.copy_(input)
            return output
        s = output.numel() * output.element_size()
        self._count(level, tag, s, (n - 1) / n * s)
        _all_gather(output, input, group=group)
        return output

    def broadcast(self, tensor: torch.Tensor, src: int, level: str, tag: str) -> torch.Tensor:
        """Broadcast from global rank `src` (which must belong to this rank's group at `level`)."""
        group, n = self._group(level)
        if n > 1:
            s = tensor.numel() * tensor.element_size()
            self._count(level, tag, s, s)
            dist.broadcast(tensor, src=src, group=group)
        return tensor

    def any_everywhere(self, flag: bool, tag: str, device: torch.device | str = "cpu") -> bool:
        """True on every rank when `flag` is True on any rank (machine first, then across)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce(t, "intra", tag, op="max")
        self.all_reduce(t, "inter", tag, op="max")
        return bool(t.item() > 0)

    # ---- reading the counters ----
    def bytes(self, level: str, tag_prefix: str = "", kind: str = "wire") -> float:
        attr = "wire_bytes" if kind == "wire" else "payload_bytes"
        return sum(getattr(t, attr) for (lv, tag), t in self.traffic.items()
                   if lv == level and tag.startswith(tag_prefix))

    def reset(self) -> None:
        self.traffic.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        return {f"{lv}/{tag}": {"calls": t.calls, "payload_bytes": t.payload_bytes, "wire_bytes": t.wire_bytes}
                for (lv, tag), t in sorted(self.traffic.items())}
