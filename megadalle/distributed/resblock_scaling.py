"""Per-resblock fp16 gradient scaling (DALL-E, section 2.4 and appendix D).

One global loss scale fails for deep fp16 transformers: gradient magnitudes differ by orders of
magnitude between resblocks, so a scale small enough to keep the largest from overflowing lets
the smallest underflow to zero. DALL-E gives every resblock (attention and MLP separately) its
own scale. This module implements that on top of any model that exposes `resblocks` (each with a
`branch(x)` residual function) and a `resblock_runner` (see docs/DESIGN.md).

How a resblock runs (`ResblockScaler.runner`):

    forward:   out = x + float(branch_fp16(x))           residual stream x stays fp32
    backward:  g (fp32, from the residual stream)
               -> g * s/M, cast to fp16, enters the branch    (_ScaleGradient)
               -> fp16 backward through the branch: parameter gradients and input gradient
               -> input gradient: inf/nan set to 0, divided by s/M, fp32   (_FilterUnscale)
               -> joins the identity path

The branch computes under fp16 autocast, so matmuls and their backward run in fp16 (where
underflow and overflow happen), while norms' gains, biases and the residual stream stay fp32,
and parameters keep fp32 master copies. Embeddings, unembeddings and logits live outside the
resblocks and never see a scale.

Parameter gradients of a block arrive scaled by s/M. A hook on every parameter (it fires when
the parameter's gradient is computed, before it is accumulated into `.grad` or handed to
DeepSpeed's ZeRO reduction hooks) divides it by s/M in fp32 and records whether it was finite.
So no optimizer, clipping or reduction ever sees a scaled gradient, and ZeRO stages 1 and 2
need no special support.

Where M (the data-parallel replicas) goes: the paper divides each rank's loss by the global
batch (so each rank holds 1/M of the local-mean gradient, and gradients are summed) and
multiplies the scales by M. DeepSpeed instead averages local-mean gradients. Scaling the
entering gradient of a local-mean loss by s/M gives exactly the paper's fp16 magnitudes, and
unscaling by s/M gives the local-mean gradient DeepSpeed expects. The scales reported and saved
are the paper's (including the factor M).

The controller (`after_backward`, the trainer's gradient hook; called once per optimizer step):
flags are agreed across ranks (all-reduce MAX); every block whose gradients were all finite
grows by 2^(1/1000); if any block (or any parameter outside the blocks) was non-finite the whole
update is skipped and each flagged block's scale is divided by sqrt(2), but a scale is divided
at most once per `backoff_window` (125) updates; every scale is then clamped to
[M*2^7, M*2^24].
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from megadalle.config import PrecisionConfig


class _ScaleGradient(torch.autograd.Function):
    """Identity in forward (fp16 -> fp32); multiplies the gradient by `factor` into fp16."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.in_dtype = y.dtype
        ctx.save_for_backward(factor)
        return y.float()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors
        # Multiply in fp32 first: the product is what must fit in fp16, not the factor alone.
        return (g.float() * factor).to(ctx.in_dtype), None


class _FilterUnscale(torch.autograd.Function):
    """Identity in forward; in backward sets inf/nan to 0 and divides by `factor`, in fp32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (factor,) = ctx.saved_tensors
        g = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
        return g / factor, None


def default_branch_call(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.branch(x)


class ResblockScaler:
    """Per-resblock gradient scales, their controller, and the trainer's gradient hook.

    `blocks` are the model's resblocks in order; `params_outside` are the remaining trainable
    parameters (embeddings, final norm, unembedding), whose gradients are only checked.
    `branch_call(block, x) -> y` lets activation checkpointing wrap the branch.
    """

    def __init__(self, blocks: Sequence[nn.Module], cfg: PrecisionConfig, world_size: int = 1,
                 params_outside: Sequence[nn.Parameter] = (), device: torch.device | str = "cpu",
                 branch_call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_branch_call,
                 autocast_dtype: torch.dtype = torch.float16, process_group: Any = None) -> None:
        if not blocks:
            raise ValueError("ResblockScaler needs at least one resblock")
        self.blocks = list(blocks)
        self.index = {id(b): i for i, b in enumerate(self.blocks)}
        self.cfg = cfg
        self.world_size = int(world_size)
        self.log2_m = math.log2(self.world_size)
        self.device = torch.device(device)
        self.branch_call = branch_call
        self.autocast_dtype = autocast_dtype
        self.process_group = process_group
        n = len(self.blocks)
        # log2 of each block's scale, paper convention (includes the factor M).
        self.log2_scales = torch.full((n,), self.log2_m + cfg.init_scale_log2, dtype=torch.float64)
        self.last_decrease = torch.full((n,), -(10**9), dtype=torch.long)
        self.updates = 0  # controller iterations: one per attempted optimizer step
        self.skipped = 0
        # Per-block non-finite flags (+ one slot for parameters outside the blocks), on the
        # compute device so hooks never synchronise with the host.
        self._flags = torch.zeros(n + 1, dtype=torch.bool, device=self.device)
        self.last_flags = torch.zeros(n + 1, dtype=torch.bool)
        self._factors = self._make_factors()
        self._handles: list[Any] = []
        seen: set[int] = set()
        for i, b in enumerate(self.blocks):
            for p in b.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    self._handles.append(p.register_hook(self._param_hook(i, True)))
        for p in params_outside:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._handles.append(p.register_hook(self._param_hook(n, False)))

    # ---- scales ----
    @property
    def scales(self) -> torch.Tensor:
        """The paper's per-block scales (including the factor M), float64 on CPU."""
        return torch.exp2(self.log2_scales)

    def set_scales_log2(self, log2_scales: torch.Tensor) -> None:
        """Set every block's scale (paper convention, log2), e.g. from a calibration run."""
        if tuple(log2_scales.shape) != (len(self.blocks),):
            raise ValueError(f"expected {len(self.blocks)} scales, got shape {tuple(log2_scales.shape)}")
        self.log2_scales = log2_scales.detach().to(torch.float64).cpu().clone()
        self._factors = self._make_factors()

    def _make_factors(self) -> torch.Tensor:
        # s / M: what multiplies a local-mean-loss gradient (see the module docstring).
        return torch.exp2(self.log2_scales - self.log2_m).to(torch.float32).to(self.device)

    # ---- forward path ----
    def runner(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`model.resblock_runner`: x + branch(x) with this block's gradient scale."""
        factor = self._factors[self.index[id(block)]]
        xin = _FilterUnscale.apply(x, factor)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            y = self.branch_call(block, xin)
        return x + _ScaleGradient.apply(y, factor)

    def _param_hook(self, i: int, scaled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(g: torch.Tensor) -> torch.Tensor:
            g = g.float() / self._factors[i] if scaled else g
            self._flags[i].logical_or_(~torch.isfinite(g).all())
            # A non-finite gradient skips the step anyway; zeros keep DeepSpeed's buffers clean.
            return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        return hook

    # ---- the controller (GradientHook contract) ----
    def after_backward(self, model: nn.Module | None = None) -> bool:
        """Decide this step from the flags of every micro-batch since the last call.

        Returns False when the update must be skipped; all ranks return the same answer.
        """
        flags = self._flags.to(torch.uint8)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size(self.process_group) > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.process_group)
        flags = flags.bool().cpu()
        self._flags.zero_()
        self.last_flags = flags
        block_flags = flags[:-1]
        ok = not bool(flags.any())
        cfg = self.cfg
        grow = ~block_flags
        self.log2_scales[grow] += cfg.growth_log2_per_step
        may_decrease = block_flags & (self.updates - self.last_decrease >= cfg.backoff_window)
        self.log2_scales[may_decrease] -= 0.5  # divide by sqrt(2)
        self.last_decrease[may_decrease] = self.updates
        self.log2_scales.clamp_(self.log2_m + cfg.min_scale_log2, self.log2_m + cfg.max_scale_log2)
        self.updates += 1
        if not ok:
            self.skipped += 1
        self._factors = self._make_factors()
        return ok

    def metrics(self) -> dict[str, float]:
        """Summary plus one series per block (TensorBoard draws the paper's figure 12 from them)."""
        s = self.log2_scales
        out = {"resblock_scaling/log2_min": float(s.min()), "resblock_scaling/log2_max": float(s.max()),
               "resblock_scaling/skipped_steps": float(self.skipped),
               "resblock_scaling/flagged_blocks": float(self.last_flags[:-1].sum())}
        for i, b in enumerate(self.blocks):
            out[f"resblock_scale_log2/{i:03d}_{type(b).__name__}"] = float(s[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"log2_scales": self.log2_scales.clone(), "last_decrease": self.last_decrease.clone(),
                "updates": self.updates, "skipped": self.skipped, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = len(self.blocks)
        if tuple(state["log2_scales"].shape) != (n,):
            raise ValueError(f"per-resblock scaler state has {state['log2_scales'].shape[0]} scales but the model "
                             f"has {n} resblocks; the checkpoint belongs to a different model depth")
        shift = self.log2_m - math.log2(state.get("world_size", self.world_size))
        # Resuming on a different number of replicas keeps each scale's per-replica value.
        self.log2_scales = state["log2_scales"].clone().to(torch.float64) + shift
        self.last_decrease = state["last_decrease"].clone()
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self._factors = self._make_factors()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def install(model: nn.Module, cfg: PrecisionConfig, world_size: int = 1, process_group: Any = None,
            branch_call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_branch_call) -> ResblockScaler:
    """Give every resblock of `model` its own scale; returns the scaler (the gradient hook)."""
    blocks = list(model.resblocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = [p for p in model.parameters() if id(p) not in in_blocks]
    device = next(model.parameters()).device
    scaler = ResblockScaler(blocks, cfg, world_size, outside, device, branch_call, process_group=process_group)
    model.resblock_runner = scaler.runner
    return scaler
