"""The paper's distributed scheme (Ramesh et al. 2021, section 2.5 and appendix E), on DeepSpeed's
own ZeRO-3 engine: shard inside a machine, replicate across machines.

    distributed.scheme=paper      (needs distributed.zero_stage=3)

What the paper does, and how it maps onto DeepSpeed:

- Parameters, gradients and Adam moments are sharded over the GPUs of one machine; parameter
  all-gathers and gradient reduce-scatters never leave the machine (fast NVLink). DeepSpeed's
  ZeRO-3 shards over its data-parallel group, and `deepspeed.initialize(mpu=...)` lets us name
  that group: `MachineParallelism` hands it the machine's ranks (`groups.intra`), and says there
  is no tensor or pipeline parallelism (a group of one rank).
- Machines are replicas: rank r of every machine holds the same shard. After the backward pass,
  each rank's gradient partition (DeepSpeed keeps them all in one flat buffer,
  `grad_partitions_flat_buffer`) is averaged with the ranks of the same local index on the other
  machines (`groups.inter`). `ReplicaAverage.after_backward` does that, between
  `engine.backward()` of the last micro-batch and `engine.step()`.

Why this is sound: `engine.step()` reads only that buffer. Its overflow check (inf/NaN, all-reduced
over the machine), its gradient-norm all-reduce over the machine, the clipping and the loss-scale
update all run after the average, so every machine sees the same averaged partition and takes the
same decision; an inf on one machine becomes an inf everywhere (sums propagate it). DeepSpeed
averages over the machine's L ranks itself; dividing the inter-machine sum by M makes the mean over
all L x M ranks, which is what plain data parallelism over every rank computes (tested: the losses
equal plain ZeRO-3's to float rounding). DeepSpeed's batch arithmetic then sees L ranks, so its
`train_batch_size` is micro x accumulation x L; the true global batch is that times M.

Checkpoints: every machine holds the same shards, so only machine 0 writes DeepSpeed's files (the
same names on every machine would otherwise be written M times over); every machine reads them on
resume. Our per-rank files (RNG, data position) are still written by every rank.

With distributed.powersgd.enabled the partitions cross machines compressed instead
(partition_powersgd.py); precision.bf16_state keeps weights, gradients and Adam moments in 16
bits (DeepSpeed's bf16 master options), and the EMA is sharded like the parameters (trainer.py).
"""

from __future__ import annotations

from typing import Any

from megadalle.config import Config, ConfigError
from megadalle.distributed.groups import TwoLevelGroups, build_groups


class MachineParallelism:
    """The `mpu` DeepSpeed asks for: data parallelism = this machine's ranks; no model parallelism."""

    def __init__(self, groups: TwoLevelGroups) -> None:
        import torch.distributed as dist

        self.groups = groups
        # DeepSpeed reduces some values over the model-parallel group: give it one of this rank
        # alone. new_group is collective, so every rank creates every rank's group.
        self._alone = None
        for r in range(groups.world_size):
            g = dist.new_group([r])
            if r == groups.rank:
                self._alone = g

    def get_data_parallel_group(self) -> Any:
        return self.groups.intra

    def get_data_parallel_world_size(self) -> int:
        return self.groups.gpus_per_node

    def get_data_parallel_rank(self) -> int:
        return self.groups.local_index

    def get_model_parallel_group(self) -> Any:
        return self._alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def configure_checkpointing(self, engine: Any) -> None:
        """Only machine 0 writes DeepSpeed's files: the other machines hold the same shards."""
        if self.groups.machine != 0:
            engine.save_non_zero_checkpoint = False
            engine.save_zero_checkpoint = False


def machine_parallelism(cfg: Config) -> MachineParallelism:
    """Groups for the paper scheme (collective: every rank calls it, before deepspeed.initialize)."""
    return MachineParallelism(build_groups(cfg.distributed.gpus_per_node))


class ReplicaAverage:
    """GradientHook: average each rank's ZeRO-3 gradient partition over the machines."""

    elastic = True  # carries nothing between steps: any number of ranks may resume it

    def __init__(self, engine: Any, groups: TwoLevelGroups) -> None:
        buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
        if engine.zero_optimization_stage() != 3 or buffer is None:
            raise ConfigError("distributed.scheme=paper needs DeepSpeed's ZeRO-3 optimizer (distributed.zero_stage=3) "
                              "without optimizer offload; the engine built here is not one")
        self.engine, self.groups = engine, groups
        self.bytes_sent = 0  # what this rank put on the inter-machine link, for the metrics

    def after_backward(self, model: Any = None) -> bool:
        import torch.distributed as dist

        if self.groups.machines == 1:
            return True
        buffer = self.engine.optimizer.grad_partitions_flat_buffer  # (this rank's partition elements,)
        dist.all_reduce(buffer, group=self.groups.inter)
        buffer.div_(self.groups.machines)
        self.bytes_sent += buffer.numel() * buffer.element_size()
        return True

    def metrics(self) -> dict[str, float]:
        return {"replica_average_bytes": float(self.bytes_sent)}

    def state_dict(self) -> dict[str, Any]:
        return {}  # nothing carried between steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def attach(engine: Any, cfg: Config) -> Any:
    """The scheme's gradient hook: the plain average, or PowerSGD on the partitions
    (distributed.powersgd.enabled; partition_powersgd.py)."""
    mpu = getattr(engine, "mpu", None)
    if not isinstance(mpu, MachineParallelism):
        raise ConfigError("distributed.scheme=paper: the engine was not built with the machine groups")
    average = ReplicaAverage(engine, mpu.groups)  # checks the engine is DeepSpeed's ZeRO-3 optimizer
    if not cfg.distributed.powersgd.enabled:
        return average
    from megadalle.distributed.partition_powersgd import PartitionPowerSGD

    return PartitionPowerSGD(engine, mpu.groups, cfg)
