"""`megadalle train`: stage 2, the transformer on token shards, on DeepSpeed.

    megadalle train --preset tiny                         # one process, CPU or one GPU
    deepspeed --num_gpus 2 --module megadalle train --preset tiny --distributed.zero_stage 2
    torchrun --nproc_per_node 2 -m megadalle train ...    # or srun / mpirun
    megadalle train --deepspeed_config ds_configs/zero2_bf16.json ...

Resumes from `<run_dir>/transformer/checkpoints/latest` unless `--checkpoint.resume none` (or a
path); with nothing to resume, `--init-from DIR` starts from the weights of an export or run
(fine-tuning: new optimizer, schedule and step count). Writes checkpoints, TensorBoard,
metrics.jsonl and the EMA export `transformer.safetensors` + `transformer.yaml` under
`<run_dir>/transformer/`.
"""

from __future__ import annotations

import argparse

from megadalle.commands.training_options import add_launch_arguments, apply_launch_arguments
from megadalle.config import Config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)


def run(args: argparse.Namespace, cfg: Config) -> int:
    from megadalle.training.transformer_trainer import TransformerTrainer

    cfg = apply_launch_arguments(args, cfg)
    # The process group stays up until exit (distributed.engine registers its teardown).
    trainer = TransformerTrainer(cfg, deepspeed_config=args.deepspeed_config)
    summary = trainer.train()
    if trainer.is_main:
        print(summary.describe())
    return 0
