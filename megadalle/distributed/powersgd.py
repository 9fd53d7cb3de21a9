"""The paper's gradient exchange: uncompressed inside a machine, PowerSGD between machines.

What is sharded where, and why
------------------------------
World = M machines x L ranks (groups.py). Every gradient-carrying parameter is split into L
shards, one per local index l:

* a compressed matrix (every weight with >= 2 dims that is not an embedding or unembedding; a conv
  weight [out, in, k, k] is viewed as [out, in*k*k]) is split along its LARGER dimension, so an
  attention matrix d x d gives shards d/L x d and an MLP matrix d x 4d gives d x 4d/L: the split
  the paper's rate formula assumes, and the one that sends the least for a given shard rank;
* the plain parameters (embeddings, unembeddings, gains, biases) are flattened together and cut
  into L equal slices; they are never compressed (the paper keeps them in fp32, uncompressed).

Rank l of each machine owns chunk l = [its compressed shards | shards too small to gain from
compression | its slice of the plain parameters]. The exchange per optimizer step:

1. intra: reduce-scatter the packed gradients (fp32, uncompressed): rank l now holds chunk l
   summed over its machine; /L gives the machine-averaged shard gradient G (paper: "reduce-scatter
   inside the machine").
2. every rank checks G for inf/NaN; one tiny MAX all-reduce makes every rank agree; on a
   non-finite value the step is skipped everywhere, gradients are zeroed and the error buffers are
   left untouched.
3. inter, per compressed shard (error buffer E is per rank, i.e. per machine and local index):
   E += G; P = E Q (Q: fixed Gaussian, drawn once from the seed, identical on every machine for a
   given shard); all-reduce P; P = orth(P) (Householder QR of P + eps*I); Q' = E^T P; all-reduce
   Q'; the shard's new gradient is P Q'^T / M, and E -= P Q'^T / M.
   The remaining tail of the chunk (plain slice and incompressible shards) goes through one fp32
   all-reduce, /M.
4. intra: all-gather the chunks, so every rank holds the full averaged gradient in param.grad.

Why the all-gather in 4: the paper's machines keep parameters sharded (ZeRO-3 style) and need only
their shard's gradient. DeepSpeed's ZeRO-0/1/2 keep full parameters on every rank and partition the
optimizer state (ZeRO-1/2) over ALL ranks in flat buckets that do not line up with our per-matrix
shards, so we hand DeepSpeed the full averaged gradient and let its own machinery take its
partition without communicating (`DeepSpeedExchange`: ZeRO 0 and 1; ZeRO-2/3 reduce inside their
backward hooks and are refused). The all-gather is intra-machine traffic only.

Rank: a machine spends rank r on every matrix (default: the paper's 896 scaled to d_model), each of
its L GPUs compresses its shard at ceil(r / L) (the paper: 896 = 8 x 112).

Error buffers live only for this rank's compressed shards (fp32, 1/L of the compressed weights).
In a checkpoint (per-rank files) they are stored as the SUM over machines, once per local index
(by machine 0's rank); on resume that rank broadcasts it across machines and every rank keeps
sum / M, as the paper does. Every later step depends on the error buffers only through their sum
over machines (P = sum_m E_m Q and Q' = sum_m E_m^T P are all-reduced sums), so the resumed run
follows the uninterrupted one up to float rounding, and the number of machines may change;
the number of ranks per machine (the shard layout) may not.

Byte counts come from comm.Comm (every collective passes through it).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megadalle.config import Config, ConfigError, DistributedConfig, powersgd_refusal
from megadalle.distributed.comm import Comm

# The paper's table: rank 896 at d_model 3968 with 8 GPUs per machine, i.e. 112 per GPU shard.
PAPER_RANK, PAPER_D_MODEL, PAPER_GPUS_PER_NODE = 896, 3968, 8


def default_rank(d_model: int) -> int:
    """The paper's rank scaled to d_model (896 at 3968)."""
    return max(PAPER_GPUS_PER_NODE, round(PAPER_RANK * d_model / PAPER_D_MODEL))


def shard_rank(rank: int, gpus_per_node: int) -> int:
    """Rank of each GPU shard's approximation: a machine spends rank r on every matrix, split over
    its L GPUs, as the paper's 896 = 8 x 112 ("112 per GPU shard"). This keeps the rank relative to
    a shard's size, hence the approximation quality, whatever L is; the bytes saved then depend on
    L (see predicted_compression_rate)."""
    return max(1, math.ceil(rank / gpus_per_node))


def predicted_compression_rate(rank_per_shard: int, d_model: int, gpus_per_node: int) -> float:
    """Fraction of inter-machine bytes saved on the transformer's weight matrices.

    Per layer the weights are 4 d x d (attention) and 2 d x 4d (MLP) matrices, each split L ways
    along its larger side. A shard a x b at rank s sends (a + b) s numbers instead of a b:
    attention (d/L x d): s (L + 1)/d per number, MLP (d x 4d/L): s (L/4 + 1)/d; weighted 4:8 the
    fraction sent is (L/2 + 1) s / d, i.e. r (1/2 + 1/L) / d with s = r/L. With L = 8 this is the
    paper's 1 - 5r/(8 d); with 2 GPUs per machine it is 1 - r/d.
    """
    return 1.0 - (gpus_per_node / 2 + 1) * rank_per_shard / d_model


def orthogonalise(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis of the columns of p [a, s] (a >= s) via Householder QR of p + eps*I.

    LAPACK's geqrf (behind torch.linalg.qr) is Householder: backward stable, so Q^T Q = I to
    machine precision even for nearly dependent columns, where Gram-Schmidt loses orthogonality.
    The eps*I keeps the factorisation well defined when p has zero or repeated columns (e.g. a
    gradient that is exactly zero), as in the paper.
    """
    p = p.clone()
    s = min(p.shape)
    p.diagonal()[:s] += eps  # p + eps * I[a, s]
    q, _ = torch.linalg.qr(p, mode="reduced")  # q: [a, s]
    return q


def draw_q(seed: int, param_index: int, local_index: int, cols: int, rank: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed Gaussian Q [cols, rank] of one shard. Same (seed, parameter, local index) -> same Q
    on every machine, so the all-reduced P = sum_m E_m Q is the projection of the summed errors."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + param_index) * 1_009 + local_index)
    return torch.randn(cols, rank, generator=gen).to(device)  # (b, s)


def low_rank_round(errors: list[torch.Tensor], qs: list[torch.Tensor], comm: Comm, machines: int,
                   eps: float) -> list[torch.Tensor]:
    """One PowerSGD round between machines on error-fed matrices E_j [a_j, b_j] (E += G done).

    P = E Q; all-reduce P; P = orth(P); Q' = E^T P; all-reduce Q'; U = P Q'^T / M (the machines'
    mean gradient projected on P); E -= U. Returns the U_j (fp32). Two all-reduces for all the
    matrices together. Products run in fp32 whatever the error buffers' dtype (16-bit buffers
    only store the values).
    """
    p_flat = torch.cat([(e.float() @ q).reshape(-1) for e, q in zip(errors, qs)])  # sum_j a_j s_j
    comm.all_reduce(p_flat, "inter", "powersgd.p")
    ps, off = [], 0
    for e, q in zip(errors, qs):
        a, s = e.shape[0], q.shape[1]
        ps.append(orthogonalise(p_flat[off:off + a * s].view(a, s), eps))  # (a, s)
        off += a * s
    q_flat = torch.cat([(e.float().T @ p).reshape(-1) for e, p in zip(errors, ps)])  # sum_j b_j s_j
    comm.all_reduce(q_flat, "inter", "powersgd.q")
    updates, off = [], 0
    for e, p, q0 in zip(errors, ps, qs):
        b, s = q0.shape
        q = q_flat[off:off + b * s].view(b, s)  # (b, s), summed over machines
        off += b * s
        update = p @ q.T / machines  # (a, b)
        e.sub_(update.to(e.dtype))
        updates.append(update)
    return updates


@dataclass
class _Shard:
    """One compressed parameter's shard for one local index, located in that index's chunk."""

    param_index: int  # into Layout.matrices
    offset: int  # start in the chunk
    rows: int  # a
    cols: int  # b
    rank: int  # s; 0 = sent uncompressed (too small to gain)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


@dataclass
class _Matrix:
    name: str
    param: nn.Parameter
    rows: int  # 2-D view [rows, cols] of the gradient
    cols: int
    split_dim: int  # 0: shards are row blocks, 1: column blocks
    bounds: list[tuple[int, int]]  # per local index, [start, end) along split_dim


@dataclass
class Layout:
    """Where every gradient number lives in the packed buffer [L * chunk]; same on all ranks."""

    gpus_per_node: int
    matrices: list[_Matrix]
    plain: list[tuple[str, nn.Parameter]]
    shards: list[list[_Shard]]  # [local index] -> compressed shards first, then dense ones
    compressed_numel: list[int]  # [local index] numbers handled by PowerSGD (a prefix of the chunk)
    plain_offset: list[int]  # [local index] where the plain slice starts in the chunk
    plain_bounds: list[tuple[int, int]]  # [local index] slice of the flat plain vector
    chunk: int  # padded chunk size (every chunk has the same size for the collectives)


def is_plain(name: str, ndim: int, embedding: bool, patterns: list[str]) -> bool:
    """Sent uncompressed in fp32: embeddings, gains and biases (< 2 dims), and `patterns` (the
    unembeddings), as the paper does."""
    return ndim < 2 or embedding or any(fnmatch.fnmatch(name, pat) for pat in patterns)


def build_layout(model: nn.Module, gpus_per_node: int, rank_per_shard: int,
                 uncompressed: list[str], compress: bool = True) -> Layout:
    L = gpus_per_node
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices: list[_Matrix] = []
    plain: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_plain(name, p.dim(), id(p) in embedding_params, uncompressed):
            plain.append((name, p))
            continue
        rows, cols = p.shape[0], p[0].numel()
        split_dim = 0 if rows >= cols else 1
        edges = [int(round(i * (rows, cols)[split_dim] / L)) for i in range(L + 1)]
        matrices.append(_Matrix(name, p, rows, cols, split_dim, list(zip(edges[:-1], edges[1:]))))

    plain_numel = sum(p.numel() for _, p in plain)
    pedges = [int(round(i * plain_numel / L)) for i in range(L + 1)]
    plain_bounds = list(zip(pedges[:-1], pedges[1:]))
    shards, compressed_numel, plain_offset, sizes = [], [], [], []
    for loc in range(L):
        comp, dense = [], []
        for i, m in enumerate(matrices):
            lo, hi = m.bounds[loc]
            a, b = (hi - lo, m.cols) if m.split_dim == 0 else (m.rows, hi - lo)
            s = min(rank_per_shard, a, b)
            # PowerSGD sends (a + b) s numbers instead of a b; below that it only loses accuracy.
            worth_it = compress and a * b > 0 and (a + b) * s < a * b
            (comp if worth_it else dense).append(_Shard(i, 0, a, b, s if worth_it else 0))
        offset = 0
        for sh in comp + dense:
            sh.offset = offset
            offset += sh.numel
        shards.append(comp + dense)
        compressed_numel.append(sum(sh.numel for sh in comp))
        plain_offset.append(offset)
        sizes.append(offset + plain_bounds[loc][1] - plain_bounds[loc][0])
    return Layout(L, matrices, plain, shards, compressed_numel, plain_offset, plain_bounds, max(sizes))


def _shard_view(m: _Matrix, grad2d: torch.Tensor, loc: int) -> torch.Tensor:
    lo, hi = m.bounds[loc]
    return grad2d[lo:hi] if m.split_dim == 0 else grad2d[:, lo:hi]


def pack(layout: Layout, grads: list[torch.Tensor | None], plain_grads: list[torch.Tensor | None],
         out: torch.Tensor, scale: float = 1.0) -> None:
    """Gradients -> out [L * chunk] (fp32), chunk by chunk; missing gradients count as zero."""
    L, C = layout.gpus_per_node, layout.chunk
    out.zero_()
    chunks = out.view(L, C)  # (local index, chunk)
    flat_plain = _flat(plain_grads, [p for _, p in layout.plain])
    for loc in range(L):
        for sh in layout.shards[loc]:
            m = layout.matrices[sh.param_index]
            g = grads[sh.param_index]
            if g is None or sh.numel == 0:
                continue
            src = _shard_view(m, g.reshape(m.rows, m.cols), loc)  # (a, b)
            chunks[loc, sh.offset:sh.offset + sh.numel].view(sh.rows, sh.cols).copy_(src)
        lo, hi = layout.plain_bounds[loc]
        chunks[loc, layout.plain_offset[loc]:layout.plain_offset[loc] + hi - lo].copy_(flat_plain[lo:hi])
    if scale != 1.0:
        out.mul_(scale)


def _flat(grads: list[torch.Tensor | None], params: list[nn.Parameter]) -> torch.Tensor:
    parts = [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
    return torch.cat(parts) if parts else torch.zeros(0, device=params[0].device if params else None)


def unpack(layout: Layout, buf: torch.Tensor, scale: float = 1.0) -> None:
    """buf [L * chunk] -> param.grad of every parameter (created where missing)."""
    L, C = layout.gpus_per_node, layout.chunk
    chunks = buf.view(L, C)
    for i, m in enumerate(layout.matrices):
        g2d = torch.empty(m.rows, m.cols, dtype=torch.float32, device=buf.device)
        for loc in range(L):
            sh = layout.shards[loc][_position(layout, loc, i)]
            if sh.numel:
                _shard_view(m, g2d, loc).copy_(chunks[loc, sh.offset:sh.offset + sh.numel].view(sh.rows, sh.cols))
        _set_grad(m.param, g2d, scale)
    flat_plain = torch.cat([chunks[loc, layout.plain_offset[loc]:layout.plain_offset[loc] + hi - lo]
                            for loc, (lo, hi) in enumerate(layout.plain_bounds)]) if layout.plain else None
    offset = 0
    for _, p in layout.plain:
        _set_grad(p, flat_plain[offset:offset + p.numel()], scale)
        offset += p.numel()


def _position(layout: Layout, loc: int, param_index: int) -> int:
    # Shards of a chunk are reordered (compressed first); this maps back. Built lazily, cached.
    cache = layout.__dict__.setdefault("_pos", {})
    if loc not in cache:
        cache[loc] = {sh.param_index: j for j, sh in enumerate(layout.shards[loc])}
    return cache[loc][param_index]


def _set_grad(p: nn.Parameter, value: torch.Tensor, scale: float) -> None:
    value = value.reshape(p.shape)
    if scale != 1.0:
        value = value * scale
    if p.grad is None:
        p.grad = value.to(device=p.device, dtype=p.dtype).clone()
    else:
        p.grad.copy_(value)


class ErrorFeedbackState:
    """Checkpointing of the PowerSGD error buffers, shared by the ZeRO 0/1 exchange below and the
    ZeRO-3 partition exchange (partition_powersgd.py). A subclass has `error` (this rank's buffers,
    flat), `comm`, `L`, `M`, `loc`, `rank`, `rank_per_shard`, `compressing`, `device`, `steps`,
    `skipped` and `_signature()` (what the buffers are: names and shapes, to refuse another model).
    """

    # ---- checkpointing (collective: every rank calls these, each with its own state) ----
    def state_dict(self) -> dict[str, Any]:
        """This rank's entry of a per-rank checkpoint file.

        The error buffers are summed over machines (one all-reduce across); only machine 0's ranks
        keep the sum (one copy per local index, the paper's layout), the others store None.
        """
        err_sum = self.error.to(torch.float32, copy=True)  # (compressed numel of this local index,)
        self.comm.all_reduce(err_sum, "inter", "state.error_sum")
        return {"version": 1, "gpus_per_node": self.L, "machines": self.M, "local_index": self.loc,
                "rank": self.rank, "rank_per_shard": self.rank_per_shard, "compress": self.compressing,
                "shards": self._signature(),
                "error_sum": err_sum.cpu() if self.comm.groups.machine == 0 else None,
                "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from per-rank entries: machine 0's rank of each local index broadcasts the summed
        error buffers across machines; every rank keeps sum / M (the paper's resume).

        Bad or mismatched entries raise ConfigError on EVERY rank (agreed first), never a hang."""
        problem = self._check_state(state)
        if self.comm.any_everywhere(bool(problem), "state.check", self.device):
            raise ConfigError(problem or "another rank's PowerSGD checkpoint state does not fit this run "
                                         "(its error says why)")
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])
        self.error.zero_()
        if not self.compressing or not state["compress"]:
            return
        buf = (state["error_sum"].to(self.device, torch.float32, copy=True) if self.comm.groups.machine == 0
               else torch.empty_like(self.error))
        self.comm.broadcast(buf, self.loc, "inter", "state.error_broadcast")  # global rank loc = machine 0
        self.error.copy_(buf / self.M)

    def _check_state(self, state: Any) -> str:
        keys = {"version", "gpus_per_node", "local_index", "compress", "shards", "error_sum", "steps", "skipped"}
        if not isinstance(state, dict) or state.get("version") != 1 or not keys <= set(state):
            return ("the checkpoint's PowerSGD state is missing or from another version; resume from a "
                    "checkpoint written with distributed.powersgd by this megadalle, or start afresh "
                    "(--checkpoint.resume=none)")
        if (state["gpus_per_node"], state["local_index"]) != (self.L, self.loc):
            return (f"the checkpoint's PowerSGD state was written with {state['gpus_per_node']} ranks per machine "
                    f"(local index {state['local_index']}), this run has {self.L} (local index {self.loc}); "
                    f"error buffers are sharded per local index: resume with --distributed.gpus_per_node="
                    f"{state['gpus_per_node']}")
        if not (self.compressing and state["compress"]):
            return ""
        if state["shards"] != self._signature():
            return ("the checkpoint's PowerSGD error buffers do not match this model's compressed shards "
                    "(the model or distributed.powersgd.rank changed); resume with the checkpoint's settings")
        if self.comm.groups.machine == 0:
            e = state["error_sum"]
            if not isinstance(e, torch.Tensor) or e.shape != self.error.shape:
                return (f"the checkpoint's PowerSGD error sum for local index {self.loc} is missing or has the "
                        f"wrong size; the checkpoint is damaged or from another model")
        return ""



@dataclass
class PowerSGDExchange(ErrorFeedbackState):
    """The GradientHook of docs/DESIGN.md: call `after_backward(model)` after the last micro-batch's
    backward and before the optimizer step; skip the step when it returns False.

    With `compress=False` the same hierarchical exchange runs uncompressed (reduce-scatter, fp32
    all-reduce across machines, all-gather): plain data parallelism, with per-level byte counts.
    """

    model: nn.Module
    comm: Comm
    rank: int  # the paper's r for a whole matrix; each shard uses shard_rank(rank, L)
    compress: bool = True
    seed: int = 0
    eps: float = 1e-6
    uncompressed: list[str] = field(default_factory=list)
    rank_per_shard: int = 0  # 0: shard_rank(rank, L)
    error_dtype: torch.dtype = torch.float32
    steps: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        g = self.comm.groups
        self.L, self.M, self.loc = g.gpus_per_node, g.machines, g.local_index
        self.rank_per_shard = self.rank_per_shard or shard_rank(self.rank, self.L)
        # One machine: nothing crosses the network, so compression would only lose accuracy.
        self.compressing = self.compress and self.M > 1
        self.layout = build_layout(self.model, self.L, self.rank_per_shard, self.uncompressed, self.compressing)
        self._mine = [sh for sh in self.layout.shards[self.loc] if sh.rank > 0]
        # Buffers live where the gradients are (NCCL collectives need CUDA tensors).
        self.device = next(self.model.parameters()).device
        self.error = torch.zeros(self.layout.compressed_numel[self.loc], device=self.device,
                                 dtype=self.error_dtype)  # this rank's E
        self._q = [self._draw_q(sh) for sh in self._mine]  # Q [b, s], fixed for the whole run
        self._buf = torch.zeros(self.L * self.layout.chunk, device=self.device)  # packed gradients [L * chunk]
        self._chunk = torch.zeros(self.layout.chunk, device=self.device)

    # ---- set-up ----
    def _draw_q(self, sh: _Shard) -> torch.Tensor:
        return draw_q(self.seed, sh.param_index, self.loc, sh.cols, sh.rank, self.device)

    def _error_view(self, j: int) -> torch.Tensor:
        sh = self._mine[j]
        return self.error[sh.offset:sh.offset + sh.numel].view(sh.rows, sh.cols)  # (a, b)

    # ---- the exchange ----
    @torch.no_grad()
    def after_backward(self, model: Any = None, grad_scale: float = 1.0) -> bool:
        """Average every gradient over all ranks in place (compressed across machines).

        `grad_scale`: a loss scale the gradients still carry; the error buffers hold unscaled values.
        Returns False (on every rank) when a gradient anywhere was non-finite; the gradients are
        then zeroed so the next accumulation starts clean.
        """
        lay = self.layout
        pack(lay, [m.param.grad for m in lay.matrices], [p.grad for _, p in lay.plain], self._buf, 1.0 / grad_scale)
        chunk = self._chunk
        self.comm.reduce_scatter(chunk, self._buf, "intra", "grad.reduce_scatter")
        chunk.div_(self.L)  # (chunk,) machine-averaged gradient of this rank's shards
        if self.comm.any_everywhere(not bool(torch.isfinite(chunk).all()), "nonfinite", self.device):
            for p in [m.param for m in lay.matrices] + [p for _, p in lay.plain]:
                if p.grad is not None:
                    p.grad.zero_()
            self.skipped += 1
            return False
        start = lay.compressed_numel[self.loc] if self.compressing else 0
        if self.compressing and self._mine:
            self._compressed_exchange(chunk)
        tail = chunk[start:]  # (chunk - start,) dense: plain slice, incompressible shards, padding
        self.comm.all_reduce(tail, "inter", "dense" if self.compressing else "grad.all_reduce")
        tail.div_(self.M)
        self.comm.all_gather(self._buf, chunk, "intra", "grad.all_gather")
        unpack(lay, self._buf, grad_scale)
        self.steps += 1
        return True

    def _signature(self) -> list[list[Any]]:
        return [[self.layout.matrices[sh.param_index].name, sh.rows, sh.cols] for sh in self._mine]

    def _compressed_exchange(self, chunk: torch.Tensor) -> None:
        n = self.layout.compressed_numel[self.loc]
        self.error.add_(chunk[:n])  # E += G
        updates = low_rank_round([self._error_view(j) for j in range(len(self._mine))], self._q, self.comm,
                                 self.M, self.eps)
        for sh, update in zip(self._mine, updates):
            chunk[sh.offset:sh.offset + sh.numel].view(sh.rows, sh.cols).copy_(update)


def build_exchange(model: nn.Module, cfg: DistributedConfig, d_model: int, comm: Comm) -> PowerSGDExchange:
    """The exchange from the config; `rank` 0 means the paper's rank scaled to d_model."""
    pcfg = cfg.powersgd
    return PowerSGDExchange(model, comm, rank=pcfg.rank or default_rank(d_model), compress=pcfg.enabled,
                            seed=pcfg.seed, eps=pcfg.orth_eps, uncompressed=list(pcfg.uncompressed),
                            error_dtype=error_dtype(cfg))


def error_dtype(cfg: DistributedConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.powersgd.resolved_error_dtype(cfg.scheme)]


# --------------------------------------------------------------------------------------------
# DeepSpeed integration
# --------------------------------------------------------------------------------------------

def check_supported(zero_stage: int, precision_mode: str) -> None:
    """Refuse the combinations whose gradient reduction we cannot take over from DeepSpeed.

    The config refuses them at start-up already (`powersgd_refusal`); this checks the engine
    DeepSpeed actually built, which a hand-written DeepSpeed JSON may have changed."""
    problem = powersgd_refusal(zero_stage, precision_mode)
    if problem:
        raise ConfigError(problem)


class DeepSpeedExchange:
    """`PowerSGDExchange` wired into a DeepSpeed engine: the GradientHook the trainer calls.

    ZeRO-0: the engine's own all-reduce is switched off (`enable_backward_allreduce`); the optimizer
    reads param.grad, which the exchange fills with the averaged gradient.
    ZeRO-1 (DeepSpeedZeroOptimizer without overlap_comm): with `enable_backward_allreduce` off,
    backward leaves gradients local on every rank and no bucket is reduced. After the exchange every
    rank holds the same averaged gradient, so the optimizer's end-of-backward epilogue, which only
    copies this rank's partition out of param.grad into `averaged_gradients`, is exactly what a
    reduction would have produced; we run that epilogue and nothing else.
    ZeRO-2/3 reduce inside per-parameter backward hooks and are refused (`check_supported`).

    Other gradient hooks (per-resblock scaling, which unscales) run before it in the trainer's
    `engine.HookChain`, so a step they skip exchanges nothing.
    """

    def __init__(self, engine: Any, exchange: PowerSGDExchange) -> None:
        self.engine, self.exchange = engine, exchange
        stage = engine.zero_optimization_stage()
        opt = engine.optimizer
        if stage == 1:
            from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

            if (not isinstance(opt, DeepSpeedZeroOptimizer) or getattr(opt, "overlap_comm", False)
                    or getattr(opt, "use_grad_accum_attribute", False)):
                raise ConfigError(
                    f"PowerSGD with ZeRO-1 needs DeepSpeed's ZeRO optimizer accumulating in param.grad without "
                    f"overlap_comm, got {type(opt).__name__}; with bf16 use --distributed.zero_stage=0")
        elif stage != 0:
            check_supported(stage, "fp32")
        if engine.fp16_enabled():
            check_supported(0, "fp16")
        self.stage = stage
        engine.enable_backward_allreduce = False

    def after_backward(self, model: Any = None) -> bool:
        ok = self.exchange.after_backward(self.engine.module)
        if ok and self.stage == 1:
            opt = self.engine.optimizer
            opt.set_gradient_accumulation_boundary(True)
            opt.independent_gradient_partition_epilogue()
        return ok

    def metrics(self) -> dict[str, float]:
        """Mean bytes per exchanged step each rank put on the wire, per level (for the trainer's log)."""
        comm, steps = self.exchange.comm, max(1, self.exchange.steps)
        return {"powersgd_inter_bytes": comm.bytes("inter") / steps,
                "powersgd_intra_bytes": comm.bytes("intra") / steps}

    def state_dict(self) -> dict[str, Any]:
        return self.exchange.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exchange.load_state_dict(state)


def attach(engine: Any, cfg: Config) -> DeepSpeedExchange:
    """The trainer's entry point, right after `deepspeed.initialize`: groups, counters, exchange,
    and DeepSpeed's own reduction switched off. Collective (creates process groups)."""
    from megadalle.distributed.groups import build_groups

    check_supported(cfg.distributed.zero_stage, cfg.precision.mode)
    comm = Comm(build_groups(cfg.distributed.gpus_per_node))
    return DeepSpeedExchange(engine, build_exchange(engine.module, cfg.distributed, cfg.transformer.dim, comm))
