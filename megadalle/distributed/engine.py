"""DeepSpeed engine set-up and the few collective helpers the training loop needs.

This is the only module (with the rest of `distributed/`) that imports deepspeed or
torch.distributed for training. It provides:

- `init_distributed(dist_cfg)`: a process group for any launcher (deepspeed, torchrun, srun,
  mpirun) or none at all, in which case a 1-rank gloo group is created on a free local port.
- `build_engine(model, cfg, train)`: AdamW with weight-decay groups, the DeepSpeed JSON from the
  typed config (optionally merged with a hand-written one), `deepspeed.initialize`.
- `install_activation_checkpointing(model, every_k, impl)`: wraps the model's `resblock_runner`.
- `set_lr`, `skip_step`, `grad_norm`, `full_fp32_named_parameters` (EMA / export under any ZeRO
  stage), and object collectives (`all_gather_object`, `broadcast_object`, `barrier`, `mean_across_ranks`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import resource
import socket
import sys
from typing import Any, Iterator

import torch
from torch import nn

from megadalle.config import Config, ConfigError, DistributedConfig, OptimizerConfig, TrainConfig
from megadalle.distributed.ds_config import build_ds_config, load_user_config, merge_user_config
from megadalle.distributed.launch import DistEnv, discover, rendezvous

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_deepspeed() -> None:
    # DeepSpeed logs every engine detail at INFO on every rank; our own progress says what matters.
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def backend_for(dist_cfg: DistributedConfig) -> str:
    if dist_cfg.backend != "auto":
        return dist_cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(dist_cfg: DistributedConfig) -> DistEnv:
    """Join (or create) the process group; returns the rank layout. Safe to call twice."""
    import torch.distributed as dist

    env = discover()
    if dist.is_available() and dist.is_initialized():
        # A live group (a second trainer in this process): deepspeed.initialize still reads
        # these from the environment, which may have changed since the group was made.
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        return env
    # DeepSpeed reads these itself; set them from whichever launcher started us (srun and mpirun
    # do not), and invent a 1-rank rendezvous when nothing launched us.
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    else:
        # [cluster] srun/mpirun ranks: master from the node list, the job id or mpi4py (launch.py).
        env = rendezvous(env)
    backend = backend_for(dist_cfg)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("distributed.backend=nccl needs CUDA GPUs; use gloo (or auto) on CPU")
        torch.cuda.set_device(env.local_rank)
    _quiet_deepspeed()
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=dist_cfg.timeout_s))
    # One group per process, torn down at exit: DeepSpeed caches its sub-groups, so a group
    # destroyed earlier could not serve a second engine in the same process (tests, notebooks).
    atexit.register(close_distributed)
    global _STARTED_GROUP
    _STARTED_GROUP = True
    import deepspeed
    import deepspeed.ops

    _quiet_deepspeed()
    if backend == "gloo":
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU that only its inference
        # path uses; the build costs minutes on a fresh machine and a build killed midway leaves
        # a lock that hangs every later process. Training never calls it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Adopts the group created above instead of creating another.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=dist_cfg.timeout_s))
    return env


_STARTED_GROUP = False  # whether this process ever ran init_distributed (exit_process's business)


def started_a_group() -> bool:
    return _STARTED_GROUP


def close_distributed() -> None:
    """Tear the process group down, and DeepSpeed's cached sub-groups with it, so that a later
    `init_distributed` in the same process starts clean."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    ds_groups = sys.modules.get("deepspeed.utils.groups")
    if ds_groups is not None:
        for name in list(vars(ds_groups)):
            value = getattr(ds_groups, name)
            if name.startswith("_") and name.isupper() and "GROUP" in name:
                setattr(ds_groups, name, {} if isinstance(value, dict) else None)
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None:
        ds_comm.cdb = None


def exit_process(code: int) -> None:
    """End a program that may have run a process group, with `code`.

    Every rank meets the others first (no rank tears its group down while a peer still talks to
    it), then the groups go and the process leaves through os._exit after flushing. The skipped
    part is C++ static destruction: under load it found gloo's threads still joinable after every
    run had finished and aborted ("terminate called without an active exception", exit -6; seen
    in CI on 4 gloo processes that had trained and written everything). Files are closed by then:
    trainers close theirs before returning, and os._exit only skips the interpreter's teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if code == 0 and backend_of_group() == "gloo":  # bounded: a failed peer must not hang us
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
            elif code == 0:
                dist.barrier()
        except Exception as e:  # leaving anyway; the peer's own exit code says what went wrong
            print(f"note: ranks did not meet before exiting ({type(e).__name__}: {e})", file=sys.stderr)
        close_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (every rank must pass the same keys)."""
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if backend_of_group() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / dist.get_world_size()).cpu()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def any_across_ranks(flag: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if backend_of_group() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def backend_of_group() -> str:
    import torch.distributed as dist

    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "none"


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: gains, biases and embeddings (kept fp32 in the paper) get no weight decay.

    Excluded: every parameter with fewer than 2 dims (gains, biases), every `nn.Embedding` weight,
    and names returned by an optional `model.no_weight_decay()` (e.g. bare embedding tensors such
    as per-position pad embeddings or an unembedding held as an `nn.Parameter`).
    """
    no_decay: set[str] = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            for pname, _ in mod.named_parameters(recurse=False):
                no_decay.add(f"{mod_name}.{pname}" if mod_name else pname)
    extra = getattr(model, "no_weight_decay", None)
    if callable(extra):
        no_decay.update(extra())
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (keep if p.ndim < 2 or name in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict[str, Any]], opt: OptimizerConfig, on_cuda: bool,
                    offload: bool = False) -> torch.optim.Optimizer:
    """AdamW with the configured implementation; `auto` picks the fastest one available.

    With `offload` (distributed.offload_optimizer) ZeRO keeps the fp32 masters and moments on the
    CPU and steps there, so the optimizer must be a CPU one even on a GPU machine: DeepSpeed's
    CPU Adam for impl=deepspeed (a compiled op), else torch's multi-tensor AdamW.
    """
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if offload:
        if opt.impl == "apex":
            raise ConfigError("optimizer.impl=apex runs on the GPU and distributed.offload_optimizer=true steps on "
                              "the CPU; use optimizer.impl=auto or deepspeed")
        if opt.impl == "deepspeed":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if opt.impl == "apex":
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("optimizer.impl=apex but NVIDIA apex is not installed; install apex from "
                              "source with its CUDA extensions, or use optimizer.impl=auto") from None
        if not on_cuda:
            raise ConfigError("optimizer.impl=apex needs CUDA; use optimizer.impl=auto on CPU")
        return ApexFusedAdam(groups, adam_w_mode=True, **kwargs)
    if opt.impl == "deepspeed" or (opt.impl == "auto" and on_cuda):
        if not on_cuda:
            raise ConfigError("optimizer.impl=deepspeed (FusedAdam) needs CUDA; use optimizer.impl=auto on CPU")
        try:
            from deepspeed.ops.adam import FusedAdam
            from deepspeed.ops.op_builder import FusedAdamBuilder

            if FusedAdamBuilder().is_compatible():
                return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - any build failure falls back to torch's fused AdamW
            if opt.impl == "deepspeed":
                raise ConfigError(f"optimizer.impl=deepspeed but DeepSpeed's FusedAdam cannot be built here "
                                  f"({e}); use optimizer.impl=auto") from None
        if opt.impl == "deepspeed":
            raise ConfigError("optimizer.impl=deepspeed but DeepSpeed's FusedAdam is not compatible with "
                              "this machine; use optimizer.impl=auto")
    # torch: fused kernel on CUDA, foreach (multi-tensor) on CPU.
    return torch.optim.AdamW(groups, fused=on_cuda or None, foreach=None if on_cuda else True, **kwargs)


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def partitions_parameters(engine: Any) -> bool:
    """ZeRO-3: each rank holds only its partition of every parameter."""
    return engine.zero_optimization_stage() == 3


def local_fp32_partitions(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's flat partition of the parameter's master copy, fp32 on CPU) under ZeRO-3.

    No communication: a sharded EMA folds these in place of gathered full parameters."""
    from deepspeed.utils import safe_get_local_fp32_param

    for name, p in engine.module.named_parameters():
        yield name, safe_get_local_fp32_param(p).detach().float().cpu()


def partition_like(engine: Any, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's flat partitions of full tensors, laid out as `local_fp32_partitions` (no
    communication): to resume a sharded EMA from a checkpoint that holds the full average."""
    import torch.distributed as dist

    out = {}
    for name, p in engine.module.named_parameters():
        group = getattr(p, "ds_process_group", None) or engine.optimizer.dp_process_group
        n, r = p.ds_tensor.ds_numel, dist.get_rank(group=group)
        piece = full[name].reshape(-1)[r * n:(r + 1) * n].float()
        out[name] = torch.cat([piece, piece.new_zeros(n - piece.numel())])  # the last rank's padding
    return out


def gather_partitions(engine: Any, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's flat partitions (as `local_fp32_partitions` gives them).

    Collective over the group ZeRO shards each parameter over. ZeRO-3 cuts a parameter's
    flattened elements into equal contiguous pieces in rank order, padding the last: concatenate
    and drop the padding."""
    import torch.distributed as dist

    out = {}
    for name, p in engine.module.named_parameters():
        part = local[name].contiguous()
        group = getattr(p, "ds_process_group", None) or engine.optimizer.dp_process_group
        pieces = [torch.empty_like(part) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(pieces, part, group=group)
        out[name] = torch.cat(pieces)[: p.ds_numel].view(p.ds_shape)
    return out


def resolve_ds_config(cfg: Config, train: TrainConfig, world: int, user_config: str | dict | None = None,
                      section: str = "train") -> dict[str, Any]:
    """Generated DeepSpeed dict, merged with a hand-written JSON (path or dict) when given."""
    on_cuda = torch.cuda.is_available()
    if cfg.precision.mode == "fp16" and not on_cuda:
        raise ConfigError(f"precision.mode={cfg.precision.mode} needs a GPU: DeepSpeed's CPU accelerator "
                          f"refuses fp16. Use precision.mode=bf16 (or fp32) on CPU")
    generated = build_ds_config(cfg, train, world)
    if user_config is None:
        return generated
    if isinstance(user_config, dict):
        return merge_user_config(generated, user_config, "the DeepSpeed config", section)
    return merge_user_config(generated, load_user_config(user_config), f"DeepSpeed config {user_config}", section)


def build_engine(model: nn.Module, cfg: Config, train: TrainConfig, user_config: str | dict | None = None,
                 section: str = "train", load_universal: bool = False) -> Any:
    """`deepspeed.initialize` for `model` under the typed config; returns the DeepSpeed engine.
    `load_universal`: the engine will load a universal checkpoint (training/elastic.py)."""
    import deepspeed

    world = world_size()
    mpu = None
    if cfg.distributed.scheme == "paper":
        # ZeRO-3 over each machine's ranks only (distributed/replicas.py): DeepSpeed's batch
        # arithmetic sees L data-parallel ranks; the true global batch (checked here) is M times that.
        from dataclasses import replace

        from megadalle.distributed.replicas import machine_parallelism

        train.global_batch(world)
        mpu = machine_parallelism(cfg)
        ds = resolve_ds_config(cfg, replace(train, global_batch_size=0), mpu.get_data_parallel_world_size(),
                               user_config, section)
    else:
        ds = resolve_ds_config(cfg, train, world, user_config, section)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    on_cuda = torch.cuda.is_available()
    if on_cuda:
        model = model.cuda()
    optimizer = build_optimizer(weight_decay_groups(model, train.optimizer.weight_decay), train.optimizer, on_cuda,
                                offload=cfg.distributed.offload_optimizer)
    _quiet_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False,
                                           mpu=mpu)
    _quiet_deepspeed()
    if mpu is not None:
        mpu.configure_checkpointing(engine)
    return engine


def local_device() -> torch.device:
    """This rank's compute device (the GPU of its local rank, else the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_dtype(engine: Any) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def device_of(engine: Any) -> torch.device:
    return engine.device if hasattr(engine, "device") else torch.device("cpu")


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def grad_norm_of_module(module: nn.Module) -> float | None:
    """Global gradient norm from `p.grad` (ZeRO-0 fp32, where DeepSpeed does not record it)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def grad_norm(engine: Any, before_step: float | None) -> float | None:
    """The norm DeepSpeed computed in its last step, else the one measured before the step."""
    value = engine.get_global_grad_norm()
    if value is None:
        return before_step
    return float(value)


def needs_manual_grad_norm(engine: Any) -> bool:
    return not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


def start_micro_step(engine: Any, last: bool) -> None:
    """Tell DeepSpeed, before a micro-batch's forward, whether its backward ends the accumulation.

    The trainer calls engine.step() once per optimizer step, after all its micro-batches. Left to
    itself, DeepSpeed counts a micro-step per step() call and would see the boundary only on every
    grad_accum_steps-th optimizer step (an update every other step at accumulation 2, over twice
    the micro-batches, the steps between counted as skipped). This is DeepSpeed's documented way
    to call step() once (DeepSpeedEngine.set_gradient_accumulation_boundary)."""
    engine.set_gradient_accumulation_boundary(last)


def skip_step(engine: Any) -> None:
    """Drop this step's gradients without touching parameters or optimizer state.

    DeepSpeed's own overflow skip does the same bookkeeping: gradients zeroed, the micro-step and
    global-step counters advanced so that the next backward starts a fresh accumulation window.
    """
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        engine.optimizer.zero_grad()
    else:
        engine.zero_grad()
    engine.micro_steps += 1
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.skipped_steps += 1


def step_was_applied(engine: Any) -> bool:
    return bool(engine.was_step_applied())


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Full parameters of `module` for the duration of the block (a no-op below ZeRO-3)."""
    params = [p for p in module.parameters(recurse=False)]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def master_params_stage0(engine: Any) -> dict[int, torch.Tensor]:
    """id(model parameter) -> its fp32 master copy, where a ZeRO-0 16-bit optimizer keeps one."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if engine.zero_optimization() or not isinstance(low, list) or not isinstance(high, list):
        return {}
    return {id(p): m for g16, g32 in zip(low, high) if isinstance(g16, list) and isinstance(g32, list)
            for p, m in zip(g16, g32)}


def optimizer_group_names(engine: Any) -> list[list[str]] | None:
    """Parameter names per optimizer group (ZeRO-0 only: ZeRO groups hold flat partitions)."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = getattr(engine.optimizer, "fp16_groups", None) or [g["params"] for g in engine.optimizer.param_groups]
    out = [[names.get(id(p)) for p in g] for g in groups]
    return None if any(n is None for g in out for n in g) else out


def full_fp32_named_parameters(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 CPU tensor) for every parameter under any ZeRO stage and precision.

    Every rank must iterate (gathering is collective); the master (fp32) copy is used where
    DeepSpeed keeps one, so an EMA or export of a bf16 run is not rounded to 16 bits.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    # ZeRO-0 16-bit: DeepSpeed's unfused optimizer pairs each 16-bit parameter with an fp32 master.
    masters = master_params_stage0(engine)
    for name, p in engine.module.named_parameters():
        full = masters.get(id(p))
        if full is None and (engine.zero_optimization() or engine.bfloat16_enabled()):
            full = safe_get_full_fp32_param(p)
        if full is None:
            if hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.detach().clone()
            else:
                full = p.detach()
        yield name, full.detach().float().cpu()


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


def install_activation_checkpointing(model: nn.Module, every_k: int = 1, impl: str = "torch") -> int:
    """Recompute one resblock in `every_k` during backward; returns how many blocks are checkpointed.

    Wraps whatever `model.resblock_runner` is already installed (plain residual, or a per-resblock
    gradient scaler), so the two compose: the checkpointed function is the whole runner call.
    """
    blocks = getattr(model, "resblocks", None)
    inner = getattr(model, "resblock_runner", None)
    if blocks is None or inner is None:
        raise ConfigError(f"distributed.activation_checkpointing needs a model with `resblocks` and "
                          f"`resblock_runner`; {type(model).__name__} has neither; turn it off for this model")
    chosen = {id(b) for i, b in enumerate(blocks) if i % every_k == 0}
    if impl == "deepspeed":
        import deepspeed

        if not deepspeed.checkpointing.is_configured():
            deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=False,
                                              contiguous_checkpointing=False, synchronize=False, profile=False)
        ds_checkpoint = deepspeed.checkpointing.checkpoint

        def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return ds_checkpoint(lambda t: inner(block, t), x)
    else:
        from torch.utils.checkpoint import checkpoint

        def checkpointed(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            # Non-reentrant: works with inputs that do not require grad and with ZeRO-3 hooks.
            return checkpoint(inner, block, x, use_reentrant=False)

    def runner(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and id(block) in chosen:
            return checkpointed(block, x)
        return inner(block, x)

    model.resblock_runner = runner
    return len(chosen)


# --------------------------------------------------------------------------------------------
# Memory and device peak
# --------------------------------------------------------------------------------------------


def peak_memory_bytes() -> int:
    """Peak accelerator memory on GPU; the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak_kb * (1 if sys.platform == "darwin" else 1024))


# Dense peak FLOP/s per device (vendor data sheets) for the 16-bit tensor-core and fp32 paths.
_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"16": 989e12, "32": 67e12},
    "H100": {"16": 989e12, "32": 67e12},
    "A100": {"16": 312e12, "32": 19.5e12},
    "A10": {"16": 125e12, "32": 31.2e12},
    "L4": {"16": 121e12, "32": 30.3e12},
    "V100": {"16": 125e12, "32": 15.7e12},
}


def device_peak_flops(dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of this rank's device, or None where unknown (CPUs)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    kind = "32" if dtype == torch.float32 else "16"
    for key, peaks in _PEAK_FLOPS.items():
        if key in name:
            return peaks[kind]
    return None


class HookChain:
    """Several gradient hooks as one: each runs in order; the first False skips the rest."""

    def __init__(self, *hooks: Any) -> None:
        self.hooks = [h for h in hooks if h is not None]

    def after_backward(self, model: nn.Module) -> bool:
        return all(h.after_backward(model) for h in self.hooks)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in self.hooks:
            out.update(h.metrics() if hasattr(h, "metrics") else {})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{type(h).__name__}": h.state_dict() for i, h in enumerate(self.hooks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [f"{i}:{type(h).__name__}" for i, h in enumerate(self.hooks)]
        if sorted(state) != sorted(names):
            raise ConfigError(f"the checkpoint's gradient hooks {sorted(state)} differ from this run's {names}; "
                              f"resume with the same precision and compression settings")
        for name, h in zip(names, self.hooks):
            h.load_state_dict(state[name])


def install_precision(model: nn.Module, cfg: Config, gradient_hook: Any = None) -> Any:
    """Install what the precision mode needs inside the model; returns the gradient hook to use.

    fp16_per_resblock: a scale per resblock (attention and MLP separately), run before any
    other gradient hook so that a skipped step skips the gradient exchange too.
    """
    if cfg.precision.mode != "fp16_per_resblock":
        return gradient_hook
    if not hasattr(model, "resblocks") or not hasattr(model, "resblock_runner"):
        raise ConfigError(f"precision.mode=fp16_per_resblock needs a model made of resblocks (the transformer); "
                          f"{type(model).__name__} has none: use precision.mode=bf16, fp16 or fp32 for it")
    from megadalle.distributed.resblock_scaling import install

    scaler = install(model, cfg.precision, world_size())
    return HookChain(scaler, gradient_hook) if gradient_hook is not None else scaler


def call_hook(hook: Any, module: nn.Module) -> bool:
    """The gradient hook's verdict, agreed by every rank (one rank's False skips everywhere)."""
    ok = bool(hook.after_backward(module))
    return not any_across_ranks(not ok)


__all__ = [
    "init_distributed", "close_distributed", "exit_process", "started_a_group", "start_micro_step", "rank", "world_size", "barrier", "all_gather_object",
    "broadcast_object", "mean_across_ranks", "weight_decay_groups", "build_optimizer", "resolve_ds_config",
    "build_engine", "set_lr", "grad_norm", "skip_step", "full_fp32_named_parameters", "gathered",
    "install_activation_checkpointing", "peak_memory_bytes", "device_peak_flops", "call_hook",
    "install_precision", "HookChain", "partitions_parameters", "local_fp32_partitions", "partition_like",
    "gather_partitions",
]
