# Shared body of the megadalle sbatch scripts; sourced after the script has set
#   NODES, GPUS_PER_NODE   the counts in its #SBATCH lines (checked against the job below)
#   COMMAND                train-dvae | train
# and it runs `megadalle $COMMAND "$@"` on every GPU of the job.
#
# Knobs (environment):
#   LAUNCHER=srun|deepspeed   srun (default): one task per GPU, ranks from SLURM_* variables;
#                             deepspeed: the deepspeed launcher with a hostfile (needs pdsh +
#                             passwordless ssh between nodes, or DS_LAUNCHER=slurm).
#   MAX_REQUEUES=20           requeues after a pre-emption, time limit or failed rank.
#   STOP_MARGIN_S=120         stop this long before the time limit (see the deadline below).
#   PYTHON=python             interpreter of the environment megadalle is installed in.
#   MEGADALLE_PROGRAM         what runs on each rank instead of "$PYTHON -u -m megadalle $COMMAND",
#                             e.g. "python -m megadalle smoke" to test the wiring.
#
# Requeue protocol: `#SBATCH --signal=B:USR1@120` sends USR1 to this shell 120 s before the time
# limit; the trap forwards it to srun, which forwards it to every rank; the ranks agree on a step,
# save a checkpoint and exit 75. A failed peer makes the others exit 76. On 75/76 (or a rank
# killed by a signal) this script runs `scontrol requeue`, and the requeued job resumes from the
# latest checkpoint (checkpoint.resume=latest). The deepspeed launcher cannot forward signals to
# remote ranks, so every rank also stops by itself at the deadline MEGADALLE_STOP_AT.

set -uo pipefail

megadalle_die() { echo "megadalle-slurm: error: $*" >&2; exit 2; }

: "${NODES:?set NODES in the sbatch script}"
: "${GPUS_PER_NODE:?set GPUS_PER_NODE in the sbatch script}"
: "${COMMAND:?set COMMAND (train-dvae or train) in the sbatch script}"
LAUNCHER="${LAUNCHER:-srun}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"
STOP_MARGIN_S="${STOP_MARGIN_S:-120}"
PYTHON="${PYTHON:-python}"

[ -n "${SLURM_JOB_ID:-}" ] || megadalle_die "not inside a SLURM job: submit with sbatch $0"
if [ "${SLURM_JOB_NUM_NODES:-$NODES}" != "$NODES" ]; then
    megadalle_die "the job holds ${SLURM_JOB_NUM_NODES} node(s) but the script says NODES=$NODES;" \
                  "keep #SBATCH --nodes and NODES equal"
fi
if [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "$LAUNCHER" = srun ] \
        && [ "$SLURM_NTASKS_PER_NODE" != "$GPUS_PER_NODE" ]; then
    megadalle_die "SLURM_NTASKS_PER_NODE=$SLURM_NTASKS_PER_NODE but GPUS_PER_NODE=$GPUS_PER_NODE; one task per GPU"
fi
case "$LAUNCHER" in srun|deepspeed) ;; *) megadalle_die "LAUNCHER=$LAUNCHER: choose srun or deepspeed" ;; esac

source "${MEGADALLE_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/env.sh"

# Hostfile (deepspeed's format, one "host slots=N" line per node) from SLURM's node list; it also
# names the rendezvous host. The port is derived from the job id, as srun ranks derive it.
JOB_DIR="${JOB_DIR:-${SLURM_SUBMIT_DIR:-.}/runs/slurm/${SLURM_JOB_ID}}"
mkdir -p "$JOB_DIR"
HOSTFILE="$JOB_DIR/hostfile"
scontrol show hostnames "${SLURM_JOB_NODELIST:?}" \
    | "$PYTHON" -m megadalle launch hostfile --slots "$GPUS_PER_NODE" --expect-nodes "$NODES" \
        --out "$HOSTFILE" \
    || megadalle_die "could not build $HOSTFILE from SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
export MASTER_ADDR="${MASTER_ADDR:-$(head -n 1 "$HOSTFILE" | cut -d' ' -f1)}"
PORT_FROM_JOB="from megadalle.distributed.launch import port_from_job; print(port_from_job('$SLURM_JOB_ID'))"
export MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c "$PORT_FROM_JOB")}"

# Deadline: every rank stops on its own STOP_MARGIN_S before the end of the job.
END_TIME="$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null || true)"
if [ -n "$END_TIME" ] && END_S="$(date -d "$END_TIME" +%s 2>/dev/null)"; then
    export MEGADALLE_STOP_AT=$((END_S - STOP_MARGIN_S))
fi

read -r -a PROGRAM <<< "${MEGADALLE_PROGRAM:-$PYTHON -u -m megadalle $COMMAND}"
echo "megadalle-slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}/$MAX_REQUEUES): $NODES node(s) x" \
     "$GPUS_PER_NODE GPU(s) via $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE," \
     "stop at ${MEGADALLE_STOP_AT:-(time limit unknown)}: ${PROGRAM[*]} $*"

if [ "$LAUNCHER" = srun ]; then
    # No --kill-on-bad-exit: ranks leaving with 75 after a stop would kill peers still writing
    # their checkpoint shards; megadalle's watchdog ends the job when a rank really fails.
    srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=0 \
        "${PROGRAM[@]}" "$@" &
else
    export DS_ENV_FILE="$JOB_DIR/deepspeed_env"
    env | grep -E '^(NCCL_|TORCH_NCCL_|GLOO_|OMP_NUM_THREADS=|TOKENIZERS_|PYTHONUNBUFFERED=|MEGADALLE_)' \
        > "$DS_ENV_FILE" || true
    deepspeed --hostfile "$HOSTFILE" --num_nodes "$NODES" --num_gpus "$GPUS_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --launcher "${DS_LAUNCHER:-pdsh}" \
        --no_local_rank --module megadalle "$COMMAND" "$@" &
fi
LAUNCH_PID=$!

STOP_SIGNAL=""
INTERRUPTED=0
megadalle_forward() {
    STOP_SIGNAL="$1"
    INTERRUPTED=1
    echo "megadalle-slurm: got SIG$1, asking the ranks to save and stop" >&2
    kill -s "$1" "$LAUNCH_PID" 2>/dev/null || true
}
trap 'megadalle_forward USR1' USR1
trap 'megadalle_forward TERM' TERM

# `wait` returns early (128 + signal) when a trapped signal arrives: wait again until the
# launcher is gone and its own exit status is known.
while :; do
    INTERRUPTED=0
    wait "$LAUNCH_PID"
    RC=$?
    [ "$INTERRUPTED" = 1 ] || break
done
trap - USR1 TERM

case "$RC" in
    0) echo "megadalle-slurm: $COMMAND finished"; exit 0 ;;
    75) WHY="stopped with a checkpoint${STOP_SIGNAL:+ (SIG$STOP_SIGNAL)}" ;;
    76) WHY="a rank failed" ;;
    *)
        if [ "$RC" -le 128 ]; then
            echo "megadalle-slurm: $COMMAND failed with exit code $RC; not requeueing (fix the error above)" >&2
            exit "$RC"
        fi
        WHY="a rank was killed by signal $((RC - 128))" ;;
esac
if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    echo "megadalle-slurm: $WHY (exit $RC) but the job was already requeued $MAX_REQUEUES times; giving up" >&2
    exit "$RC"
fi
echo "megadalle-slurm: $WHY (exit $RC); requeueing job $SLURM_JOB_ID to resume from the latest checkpoint"
scontrol requeue "$SLURM_JOB_ID" \
    || megadalle_die "scontrol requeue $SLURM_JOB_ID failed (is the job requeue-able? #SBATCH --requeue)"
exit 0
