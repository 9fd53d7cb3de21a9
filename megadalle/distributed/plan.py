"""`megadalle plan`: will this model train on that cluster? Memory per GPU and traffic per step,
computed from the model built on the meta device (no memory, no GPU).

    megadalle plan --preset 12b --nodes 128 --gpus-per-node 8 --gpu-memory 16GiB

Accounting model (bytes; N = nodes x gpus_per_node GPUs, L = gpus_per_node, M = nodes,
g = the sharding group: L for "node", N for "world")
-------------------------------------------------------------------------------------------

Parameters are split the paper's way: *matrices* (every >= 2-D weight inside a resblock: 16-bit
in fp16/bf16 modes, sharded, PowerSGD-compressed) and *others* (embeddings, unembeddings, gains,
biases: fp32 with fp32 gradients and moments in every mode, never compressed).

Model states per parameter, as (weights, gradients, optimizer):

* mixed-precision Adam (DeepSpeed; "mixed"): matrices 2 + 2 + 12 (fp32 master copy, m, v)
  = 16 B; others 4 + 4 + 8 (m, v; the fp32 weight is its own master) = 16 B.
* fp32 mode: 4 + 4 + 8 = 16 B for everything.
* the paper ("paper"): matrices 2 + 2 + 4 (16-bit m and v in the paper's 1-6-9 / 0-6-10
  formats, no fp32 master copy: the paper names none) = 8 B; others 16 B as above.

ZeRO stage s divides by the sharding group g: stage 0 nothing; 1 the optimizer state; 2 also
the gradients; 3 also the weights. So mixed precision costs 16, 4 + 12/g, 2 + 14/g and 16/g
B/param per GPU for stages 0-3 (matrices). Stage 3 also holds, transiently, the gathered
weights of the running resblock and of the prefetched next one, and one resblock's full
gradient before its reduce-scatter.

The paper's scheme (section 2.5, appendix E) is reported separately: stage-3 sharding inside a
machine (g = L), the paper's 8 B/param states for matrices, and PowerSGD between machines. Its
machine-averaged shard gradient is added straight into the error-feedback buffer (the paper's
order: reduce-scatter, unscale, E += G), so the buffer replaces a persistent gradient shard;
it is counted at 16 bits (the paper stores "most parameters, Adam moments and activations" in
16 bits and states no other width for it). megadalle's powersgd.py keeps its error buffers in
fp32 (4 B / L per matrix parameter); `--error-buffer-bytes 4` shows what that costs.

Activations per resblock, micro-batch b, stream length S = text_len + image_len, width d, h
heads, MLP width f, a = activation bytes (2 in fp16/bf16, 4 in fp32), r = bytes of the identity
path (4 in fp16_per_resblock: the paper keeps it in fp32; else a), saved for backward:

  attention: r S d (input) + a S d (norm) + 3 a S d (q, k, v) + a h S^2 (probabilities; dense,
             an upper bound for the sparse backends) + a S d (attention output)
  MLP:       r S d (input) + a S d (norm) + 2 a S f (pre- and post-activation)

times b. Without checkpointing every resblock keeps all of it; with checkpointing each keeps only
its input (r S d b) and the one being recomputed holds its full set. The fp32 logits and their
gradients add 2 x 4 b (T Vt + N Vi). Temporary buffers of the kernels, the CUDA context and
allocator fragmentation are not modelled: `--reserve` sets aside memory for them.

Traffic per GPU per optimizer step (ring collectives: all-reduce 2 (n-1)/n B, reduce-scatter and
all-gather (n-1)/n B for B bytes over n ranks):

* flat data parallel over all N GPUs (DeepSpeed ZeRO 0-2): all-reduce of every gradient;
  ZeRO-3 adds two all-gathers of the weights (forward and backward).
* the paper: inside the machine, two all-gathers of the weights and one reduce-scatter of the
  gradients; between machines, each GPU all-reduces its shard over M machines: uncompressed,
  or with PowerSGD the matrices at the paper's rate 1 - 5 r / (8 d_model) (r = distributed.
  powersgd.rank, 8 GPUs per machine; powersgd.predicted_compression_rate for other L) and the
  fp32 others uncompressed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from megadalle.config import Config, TransformerConfig

GiB = 1024 ** 3
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024, "mib": 1024 ** 2,
          "gib": GiB, "tib": 1024 ** 4, "k": 1024, "m": 1024 ** 2, "g": GiB, "t": 1024 ** 4}

# (weights, gradients, optimizer) bytes per parameter: (matrices, others).
STATE_BYTES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "mixed": ((2, 2, 12), (4, 4, 8)),
    "fp32": ((4, 4, 8), (4, 4, 8)),
    "paper": ((2, 2, 4), (4, 4, 8)),
}

def parse_bytes(text: str) -> int:
    """'16GiB', '16 GB', '80G', '16384MiB' -> bytes. Bare G/M/K are binary (nvidia-smi's habit)."""
    from megadalle.errors import CommandError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CommandError(f"memory size {text!r} not understood; write it like 16GiB, 16GB, 80G or 40960MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise CommandError(f"memory size {text!r} must be > 0")
    return int(value)


# --------------------------------------------------------------------------------------------
# The model's parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    matrices: int  # >= 2-D weights inside resblocks: 16-bit, sharded, compressed
    others: int  # embeddings, unembeddings, gains, biases: fp32, uncompressed
    largest_block: int  # matrix parameters of the largest single resblock (what one all-gather brings)

    @property
    def total(self) -> int:
        return self.matrices + self.others


def count_parameters(tcfg: TransformerConfig) -> ParamCounts:
    """Build DALLETransformer on the meta device (no memory is allocated) and split its
    parameters into matrices and others."""
    import torch

    from megadalle.transformer.model import DALLETransformer

    with torch.device("meta"):
        model = DALLETransformer(tcfg)
    per_block = [sum(p.numel() for p in b.parameters() if p.dim() >= 2) for b in model.resblocks]
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(matrices=sum(per_block), others=total - sum(per_block), largest_block=max(per_block))


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def precision_bytes(mode: str) -> tuple[int, int]:
    """(activation bytes, identity-path bytes) of a precision.mode."""
    return {"fp32": (4, 4), "bf16": (2, 2), "fp16": (2, 2), "fp16_per_resblock": (2, 4)}[mode]


@dataclass(frozen=True)
class Activations:
    attention_block: int  # everything one attention resblock saves for backward
    mlp_block: int
    block_input: int  # what a checkpointed resblock keeps: its input
    logits: int  # fp32 logits and their gradients
    n_layers: int

    @property
    def full(self) -> int:
        return self.n_layers * (self.attention_block + self.mlp_block) + self.logits

    @property
    def checkpointed(self) -> int:
        return 2 * self.n_layers * self.block_input + max(self.attention_block, self.mlp_block) + self.logits


def activations(t: TransformerConfig, micro_batch: int, precision_mode: str) -> Activations:
    a, r = precision_bytes(precision_mode)
    b, S, d, h = micro_batch, t.seq_len, t.dim, t.heads
    f = t.mlp_ratio * d
    attn = b * (r * S * d + a * S * d + 3 * a * S * d + a * h * S * S + a * S * d)
    mlp = b * (r * S * d + a * S * d + 2 * a * S * f)
    logits = 2 * 4 * b * (t.text_len * t.text_vocab_size + t.image_len * t.image_vocab_size)
    return Activations(attn, mlp, b * r * S * d, logits, t.depth)


# --------------------------------------------------------------------------------------------
# Memory per GPU
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    label: str
    params: float
    grads: float
    optimizer: float
    error_buffer: float
    transient: float  # gathered weights and one resblock's gradient (sharded weights only)
    act_checkpointed: float
    act_full: float

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer + self.error_buffer + self.transient

    @property
    def total_checkpointed(self) -> float:
        return self.states + self.act_checkpointed

    @property
    def total_full(self) -> float:
        return self.states + self.act_full


def zero_memory(c: ParamCounts, act: Activations, stage: int, group: int, states: str = "mixed") -> Memory:
    """Per-GPU bytes under ZeRO `stage` with the optimizer states sharded over `group` GPUs."""
    (wm, gm, om), (wo, go, oo) = STATE_BYTES[states]
    div = lambda s: group if stage >= s else 1  # noqa: E731  (stage s and up shard this state)
    params = (wm * c.matrices + wo * c.others) / div(3)
    grads = (gm * c.matrices + go * c.others) / div(2)
    optim = (om * c.matrices + oo * c.others) / div(1)
    transient = (2 * wm + gm) * c.largest_block if stage == 3 and group > 1 else 0
    return Memory(f"ZeRO-{stage}", params, grads, optim, 0, transient, act.checkpointed, act.full)


def paper_memory(c: ParamCounts, act: Activations, gpus_per_node: int, error_buffer_bytes: int = 2) -> Memory:
    """The paper's scheme: everything sharded inside the machine, 16-bit moments, the shard
    gradient accumulated into the PowerSGD error buffer (see the module docstring)."""
    (wm, gm, om), (wo, go, oo) = STATE_BYTES["paper"]
    L = gpus_per_node
    return Memory("paper", params=(wm * c.matrices + wo * c.others) / L, grads=go * c.others / L,
                  optimizer=(om * c.matrices + oo * c.others) / L, error_buffer=error_buffer_bytes * c.matrices / L,
                  transient=(2 * wm + gm) * c.largest_block, act_checkpointed=act.checkpointed, act_full=act.full)


@dataclass(frozen=True)
class SchemeTraffic:
    inter: float  # per GPU per step between machines: PowerSGD's P and Q plus the fp32 rest
    inter_matrices: float  # of which the compressed matrices' P and Q
    inter_matrices_uncompressed: float  # what those matrices would send uncompressed (fp32)
    intra: float  # DeepSpeed's all-gathers (forward and backward) and reduce-scatter inside a machine
    rank_per_gpu: int


def configured_scheme(cfg: Config, act: Activations, counts: ParamCounts, nodes: int,
                      gpus_per_node: int) -> tuple[Memory, SchemeTraffic]:
    """distributed.scheme=paper as megadalle runs it, from the code that configures the run: the
    DeepSpeed dict `build_ds_config` writes (ds_config.zero3_state_bytes: the dtype of each state
    DeepSpeed keeps) and the partitions and matrix views `partition_powersgd` compresses (error
    buffers, bytes sent). Per GPU: the largest of the L local indices."""
    import torch

    from megadalle.distributed.ds_config import build_ds_config, zero3_state_bytes
    from megadalle.distributed.partition_powersgd import param_specs, partition_shards, slots
    from megadalle.distributed.powersgd import default_rank, error_dtype, shard_rank
    from megadalle.transformer.model import DALLETransformer

    L, M = gpus_per_node, nodes
    scfg = cfg.replace(**{"distributed.scheme": "paper", "distributed.zero_stage": 3,
                          "distributed.offload_optimizer": False})
    ds = build_ds_config(scfg, scfg.train, None)
    sb = zero3_state_bytes(ds)
    with torch.device("meta"):
        model = DALLETransformer(scfg.transformer)
    pcfg = scfg.distributed.powersgd
    slot_list = slots(param_specs(model, list(model.parameters()), list(pcfg.uncompressed)), L)
    per_rank = sum(s.partition_numel for s in slot_list)
    compress = pcfg.enabled and M > 1
    s_rank = shard_rank(pcfg.rank or default_rank(scfg.transformer.dim), L)
    err_size = torch.empty(0, dtype=error_dtype(scfg.distributed)).element_size()
    worst = (0, 0, 0)  # (error numbers, numbers sent for the matrices, dense numbers)
    for loc in range(L):
        shards, dense, _ = partition_shards(slot_list, L, loc, s_rank, compress)
        worst = max(worst, (sum(sh.rows * sh.cols for sh in shards),
                            sum((sh.rows + sh.cols) * sh.rank for sh in shards), sum(hi - lo for lo, hi in dense)))
    err, sent, dense_n = worst
    # Transient: two gathered resblocks (running, prefetched) and one resblock's full gradient, as
    # in zero_memory, plus the copy of one optimizer sub-group's gradients that DeepSpeed's step makes
    # (stage3._prepare_fp32_grad_for_sub_group; sub_group_size elements at most).
    sub_group = min(per_rank, int(ds["zero_optimization"].get("sub_group_size", 10 ** 9)))  # DeepSpeed's default
    transient = (2 * sb.weights + sb.grads) * counts.largest_block + sb.master * sub_group
    memory = Memory("deepspeed", params=sb.weights * per_rank, grads=sb.grads * per_rank,
                    optimizer=(sb.master + sb.moments) * per_rank, error_buffer=err_size * err,
                    transient=transient, act_checkpointed=act.checkpointed, act_full=act.full)
    fp32 = 4  # P, Q and the rest cross machines in fp32
    inter_matrices = 2 * _ring(M) * fp32 * sent
    inter = inter_matrices + 2 * _ring(M) * fp32 * dense_n if compress else 2 * _ring(M) * sb.grads * per_rank
    traffic_ = SchemeTraffic(inter=inter, inter_matrices=inter_matrices if compress else 0.0,
                             inter_matrices_uncompressed=2 * _ring(M) * fp32 * err,
                             intra=_ring(L) * (2 * sb.weights + sb.grads) * counts.total, rank_per_gpu=s_rank)
    return memory, traffic_


# --------------------------------------------------------------------------------------------
# Traffic per step
# --------------------------------------------------------------------------------------------


def sent_fraction(rank: int, d_model: int, gpus_per_node: int) -> float:
    """Fraction of a GPU's matrix-gradient bytes PowerSGD sends between machines: the paper's
    5 r / (8 d_model) at 8 GPUs per machine (rank r / L per GPU shard; powersgd.py)."""
    from megadalle.distributed.powersgd import predicted_compression_rate, shard_rank

    return 1.0 - predicted_compression_rate(shard_rank(rank, gpus_per_node), d_model, gpus_per_node)


def _ring(n: int) -> float:
    return (n - 1) / n if n > 1 else 0.0


@dataclass(frozen=True)
class Traffic:
    flat_zero012: float  # per GPU, all-reduce over all N
    flat_zero3: float
    intra: float  # paper, inside the machine, per GPU
    inter_uncompressed: float  # paper, between machines, per GPU
    inter_powersgd: float
    powersgd_rank: int
    compression_rate: float  # of the matrix gradients (1 - sent fraction)


def traffic(c: ParamCounts, t: TransformerConfig, nodes: int, gpus_per_node: int, rank: int) -> Traffic:
    N, L, M = nodes * gpus_per_node, gpus_per_node, nodes
    (wm, gm, _), (wo, go, _) = STATE_BYTES["mixed"]
    weights, grads = wm * c.matrices + wo * c.others, gm * c.matrices + go * c.others
    frac = sent_fraction(rank, t.dim, L)
    return Traffic(
        flat_zero012=2 * _ring(N) * grads,
        flat_zero3=2 * _ring(N) * weights + _ring(N) * grads,
        intra=2 * _ring(L) * weights + _ring(L) * grads,
        inter_uncompressed=2 * _ring(M) * grads / L,
        inter_powersgd=2 * _ring(M) * (gm * c.matrices * frac + go * c.others) / L,
        powersgd_rank=rank, compression_rate=1 - frac)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def _fits(x: float, budget: float) -> str:
    return "yes" if x <= budget else "NO"


def build_plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_memory: int, reserve: int,
               micro_batch: int = 0, shard_group: str = "world", error_buffer_bytes: int = 2) -> dict[str, Any]:
    from megadalle.errors import CommandError

    if nodes < 1 or gpus_per_node < 1:
        raise CommandError("--nodes and --gpus-per-node must be >= 1")
    if reserve >= gpu_memory:
        raise CommandError(f"--reserve ({reserve / GiB:.2f} GiB) leaves nothing of --gpu-memory "
                           f"({gpu_memory / GiB:.2f} GiB)")
    t = cfg.transformer
    b = micro_batch or cfg.train.micro_batch_size
    if b < 1:
        raise CommandError("--micro-batch must be >= 1")
    counts = count_parameters(t)
    act = activations(t, b, cfg.precision.mode)
    N = nodes * gpus_per_node
    group = N if shard_group == "world" else gpus_per_node
    states = "fp32" if cfg.precision.mode == "fp32" else "mixed"
    rows = [zero_memory(counts, act, s, group, states) for s in range(4)]
    paper = paper_memory(counts, act, gpus_per_node, error_buffer_bytes)
    from megadalle.distributed.powersgd import default_rank

    rank = cfg.distributed.powersgd.rank or default_rank(t.dim)
    comm = traffic(counts, t, nodes, gpus_per_node, rank)
    budget = gpu_memory - reserve
    scheme, scheme_traffic = configured_scheme(cfg, act, counts, nodes, gpus_per_node)
    chosen = scheme if cfg.distributed.scheme == "paper" else rows[cfg.distributed.zero_stage]
    ckpt = cfg.distributed.activation_checkpointing
    chosen_total = chosen.total_checkpointed if ckpt else chosen.total_full
    return {
        "preset": cfg.preset, "nodes": nodes, "gpus_per_node": gpus_per_node, "gpus": N,
        "gpu_memory": gpu_memory, "reserve": reserve, "budget": budget, "micro_batch": b,
        "precision": cfg.precision.mode, "shard_group": shard_group, "group_size": group, "states": states,
        "params": asdict(counts) | {"total": counts.total},
        "activations": asdict(act) | {"full": act.full, "checkpointed": act.checkpointed},
        "zero": [asdict(r) | {"total_checkpointed": r.total_checkpointed, "total_full": r.total_full} for r in rows],
        "paper": asdict(paper) | {"total_checkpointed": paper.total_checkpointed, "total_full": paper.total_full,
                                  "error_buffer_bytes": error_buffer_bytes},
        "traffic": asdict(comm),
        "configured": {"zero_stage": cfg.distributed.zero_stage, "scheme": cfg.distributed.scheme,
                       "activation_checkpointing": ckpt,
                       "total": chosen_total, "fits": chosen_total <= budget},
        "paper_fits": paper.total_checkpointed <= budget,
        "scheme": asdict(scheme) | {"total_checkpointed": scheme.total_checkpointed, "total_full": scheme.total_full,
                                    "persistent": scheme.params + scheme.grads + scheme.optimizer + scheme.error_buffer},
        "scheme_traffic": asdict(scheme_traffic),
        "scheme_fits": scheme.total_checkpointed <= budget,
    }


def format_plan(plan: dict[str, Any]) -> str:
    p, budget = plan["params"], plan["budget"]
    lines = [
        f"megadalle plan: preset {plan['preset'] or '(none)'} on {plan['nodes']} node(s) x {plan['gpus_per_node']} "
        f"GPU(s) = {plan['gpus']} GPUs of {plan['gpu_memory'] / GiB:.2f} GiB (budget {budget / GiB:.2f} GiB after "
        f"{plan['reserve'] / GiB:.2f} GiB reserve); micro-batch {plan['micro_batch']}, precision {plan['precision']}",
        f"parameters: {p['total'] / 1e9:.3f} B = {p['matrices'] / 1e9:.3f} B matrices (16-bit, sharded, compressed) "
        f"+ {p['others'] / 1e6:.1f} M others (fp32: embeddings, heads, gains, biases)",
        "",
        f"memory per GPU in GiB, {'mixed-precision' if plan['states'] == 'mixed' else 'fp32'} Adam, 16 B/param, "
        f"ZeRO sharding over {plan['group_size']} GPUs ({plan['shard_group']}):",
        "           params    grads    optim  transient  act(ckpt)  act(full)  total(ckpt)  total(full)  "
        "fits(ckpt/full)",
    ]
    for r in plan["zero"] + [plan["paper"]]:
        if r["label"] == "paper":
            lines += ["", f"the paper's scheme: sharded inside each machine ({plan['gpus_per_node']} GPUs), 16-bit "
                          f"weights and Adam moments, no fp32 master, shard gradient kept in the "
                          f"{8 * plan['paper']['error_buffer_bytes']}-bit PowerSGD error buffer "
                          f"(+{_gib(r['error_buffer']).strip()} GiB, counted under grads):"]
        grads = r["grads"] + r["error_buffer"]
        lines.append(f"  {r['label']:7s} {_gib(r['params'])}  {_gib(grads)}  {_gib(r['optimizer'])}    "
                     f"{_gib(r['transient'])}    {_gib(r['act_checkpointed'])}    {_gib(r['act_full'])}      "
                     f"{_gib(r['total_checkpointed'])}      {_gib(r['total_full'])}    "
                     f"{_fits(r['total_checkpointed'], budget)}/{_fits(r['total_full'], budget)}")
    tr = plan["traffic"]
    gb = lambda x: f"{x / 1e9:8.2f} GB"  # noqa: E731
    lines += [
        "",
        "traffic per GPU per optimizer step (ring collectives):",
        f"  flat data parallel over {plan['gpus']} GPUs, ZeRO-0/1/2 {gb(tr['flat_zero012'])}; "
        f"ZeRO-3 {gb(tr['flat_zero3'])}",
        f"  paper, inside the machine (NVLink/PCIe)  {gb(tr['intra'])}",
        f"  paper, between machines, uncompressed    {gb(tr['inter_uncompressed'])}",
        f"  paper, between machines, PowerSGD r={tr['powersgd_rank']} {gb(tr['inter_powersgd'])}  "
        f"(matrices compressed by {100 * tr['compression_rate']:.1f}% = 1 - 5r/(8 d_model); "
        f"{tr['inter_uncompressed'] / max(tr['inter_powersgd'], 1):.1f}x less inter-machine traffic)",
        "",
    ]
    c = plan["configured"]
    lines.append(f"configured plan (distributed.scheme={c['scheme']}, zero_stage={c['zero_stage']}, activation checkpointing "
                 f"{'on' if c['activation_checkpointing'] else 'off'}): {c['total'] / GiB:.2f} GiB per GPU -> "
                 f"{'fits' if c['fits'] else 'does NOT fit'}")
    lines.append(f"paper's scheme with activation checkpointing: {plan['paper']['total_checkpointed'] / GiB:.2f} GiB "
                 f"per GPU -> {'fits' if plan['paper_fits'] else 'does NOT fit'}")
    sc, st = plan["scheme"], plan["scheme_traffic"]
    lines += [
        "",
        "distributed.scheme=paper as megadalle runs it (DeepSpeed ZeRO-3 inside each machine, PowerSGD between "
        "machines; from the DeepSpeed config and partition layout the run itself uses), GiB per GPU:",
        f"  weights {_gib(sc['params']).strip()}, gradient partition {_gib(sc['grads']).strip()}, master + Adam "
        f"{_gib(sc['optimizer']).strip()}, error buffers {_gib(sc['error_buffer']).strip()}, transient "
        f"{_gib(sc['transient']).strip()}, activations (ckpt) {_gib(sc['act_checkpointed']).strip()} -> "
        f"{sc['total_checkpointed'] / GiB:.2f} GiB: {'fits' if plan['scheme_fits'] else 'does NOT fit'}",
        f"  between machines per GPU per step: {gb(st['inter'])} (matrices {gb(st['inter_matrices']).strip()} "
        f"at rank {st['rank_per_gpu']} per GPU, "
        f"{100 * st['inter_matrices'] / max(st['inter_matrices_uncompressed'], 1):.1f}% of their uncompressed "
        f"{gb(st['inter_matrices_uncompressed']).strip()}); inside the machine {gb(st['intra']).strip()}",
    ]
    return "\n".join(lines)
