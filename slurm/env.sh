# Network and runtime settings for every megadalle SLURM job, in one place. Sourced by
# slurm/common.sh before launching; with LAUNCHER=deepspeed the same variables are written into
# the launcher's environment file so that every rank on every node sees them.
# Values already set in the submitting environment win (sbatch --export=ALL is the default).

# NCCL: socket bootstrap on any interface but loopback and docker bridges; InfiniBand on when
# present. Pin adapters on clusters with several (e.g. NCCL_IB_HCA=mlx5_0,mlx5_1).
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Abort NCCL communicators on a collective error or timeout (distributed.timeout_s) instead of
# hanging: together with megadalle's watchdog a dead rank ends the job (exit code 76, requeued).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# gloo (CPU collectives, e.g. the data loader's bookkeeping) takes one interface name, no "^":
# set GLOO_SOCKET_IFNAME=ib0 (or eth0) where the default route is not the fabric.

# One rank per GPU: give each its share of the cores, never all of them.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
