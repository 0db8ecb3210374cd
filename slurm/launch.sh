#!/usr/bin/env bash
# The one Slurm launcher behind slurm/train_*.sh and slurm/convert_checkpoint.sh.
#
# Runs in the batch shell of an sbatch job (first node) and starts ONE torchrun per node
# through `srun --ntasks=$SLURM_NNODES --ntasks-per-node=1`; the torchruns meet in a c10d
# rendezvous hosted on the first node and start COVRL_NPROC_PER_NODE ranks each.
#
#   training:  COVRL_CONFIG=examples/x.yaml launch.sh [key.sub=value ...]
#              -> torchrun ... -m covrl.training.cli --config X --resume auto <overrides>
#   any tool:  launch.sh PROGRAM [ARGS ...]       (COVRL_CONFIG unset)
#              -> torchrun ... PROGRAM ARGS
#
# Environment (all optional except where said):
#   COVRL_HOME            repository root (default: the sbatch submit directory)
#   COVRL_CONFIG          run config YAML; selects training mode
#   COVRL_MODEL           -> policy.model_path=...        (Hugging Face checkpoint dir)
#   COVRL_TRAIN_FILES     -> data.train_files=[...]       (comma-separated parquet files)
#   COVRL_VAL_FILES       -> data.val_files=[...]
#   COVRL_OUTPUT          root of run directories (default: $COVRL_HOME/outputs)
#   COVRL_RUN_DIR         -> trainer.run_dir=...  (default: $COVRL_OUTPUT/<job name>-<job id>;
#                         the job id survives a requeue, so a requeued job resumes there)
#   COVRL_RESUME          --resume value (default: auto)
#   COVRL_PROGRAM         program torchrun starts in training mode
#                         (default: "-m covrl.training.cli")
#   COVRL_NPROC_PER_NODE  ranks per node (default: the job's GPUs per node, else 8)
#   COVRL_MASTER_PORT     rendezvous port on the first node (default: from the job id)
#   COVRL_TORCHRUN        torchrun executable (default: $COVRL_HOME/.venv/bin/torchrun when
#                         the checkout has that virtual environment, else torchrun on PATH)
#   COVRL_PYTHON          python for the dry-run estimate (default: $COVRL_HOME/.venv/bin/python
#                         when present, else python3 on PATH)
#   COVRL_SHUTDOWN_TIMEOUT  seconds torchrun waits for ranks after SIGTERM before SIGKILL
#                         (default 600: time for the preemption checkpoint)
#   COVRL_GPU_MEMORY_GIB  GPU memory for the dry-run estimate (default 80)
#   COVRL_DRY_RUN=1       print the layout, the torchrun command per node and the per-GPU
#                         memory estimate (training mode), then exit without launching
#   Backend variables (NCCL ones when nvidia-smi lists a GPU, else gloo/CPU ones) are set
#   only when unset: export your own to override.
#
# Logs: the batch output is where #SBATCH --output says; each node's torchrun and rank
# output goes to <run dir>/logs/<job id>.<attempt>.node<i>.log (attempt = requeue count,
# i = node index in the job).
#
# Preemption: submit with `--signal=B:USR1@<seconds>` and `--requeue` (the train scripts
# do). On USR1 this shell forwards the signal to the ranks (torchrun itself ignores it),
# the trainer checkpoints at the next step boundary and exits 0 printing
# "preempted: checkpoint saved at step N"; then this shell requeues the job, which
# resumes from that checkpoint (--resume auto). SIGTERM (scancel, time limit, preemption
# by the scheduler) reaches every process from Slurm directly; the trainer treats it
# the same way, and torchrun waits COVRL_SHUTDOWN_TIMEOUT for it.
set -euo pipefail

COVRL_HOME=${COVRL_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$COVRL_HOME"
JOB_ID=${SLURM_JOB_ID:-dryrun}
JOB_NAME=${SLURM_JOB_NAME:-covrl}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
in_slurm() { [[ -n ${SLURM_JOB_ID:-} ]]; }

if in_slurm; then
    NNODES=$SLURM_NNODES
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else  # a dry run outside Slurm: the train script's defaults
    NNODES=${COVRL_DEFAULT_NODES:-1}
    NODES=()
    for ((i = 0; i < NNODES; i++)); do NODES+=("node$i"); done
fi
NPROC_PER_NODE=${COVRL_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${COVRL_DEFAULT_GPUS_PER_NODE:-8}}}
MASTER_ADDR=${NODES[0]}
if [[ $JOB_ID =~ ^[0-9]+$ ]]; then
    MASTER_PORT=${COVRL_MASTER_PORT:-$((20000 + (JOB_ID * 7 + ATTEMPT) % 20000))}
else
    MASTER_PORT=${COVRL_MASTER_PORT:-29500}
fi

# ---------------------------------------------------------------- backend environment
if nvidia-smi -L >/dev/null 2>&1; then
    BACKEND=nccl
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron TP overlap
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
else
    BACKEND=gloo  # CPU ranks: one intra-op thread each, several ranks share the cores
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export PYTHONUNBUFFERED=1
BACKEND_VARS=(OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG
    NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME PYTHONUNBUFFERED)

# ---------------------------------------------------------------- python environment
# The checkout's virtual environment (`make install`) when it has one, so that neither
# a dry run nor the ranks depend on an activated environment; else what PATH finds.
VENV_BIN=$COVRL_HOME/.venv/bin
if [[ -z ${COVRL_PYTHON:-} ]]; then
    if [[ -x $VENV_BIN/python ]]; then COVRL_PYTHON=$VENV_BIN/python; else COVRL_PYTHON=python3; fi
fi
if [[ -z ${COVRL_TORCHRUN:-} ]]; then
    if [[ -x $VENV_BIN/torchrun ]]; then COVRL_TORCHRUN=$VENV_BIN/torchrun; else COVRL_TORCHRUN=torchrun; fi
fi

# ---------------------------------------------------------------- program and arguments
ARGS=()
if [[ -n ${COVRL_CONFIG:-} ]]; then
    OUTPUT=${COVRL_OUTPUT:-$COVRL_HOME/outputs}
    RUN_DIR=${COVRL_RUN_DIR:-$OUTPUT/$JOB_NAME-$JOB_ID}
    read -r -a PROGRAM <<<"${COVRL_PROGRAM:--m covrl.training.cli}"
    OVERRIDES=("trainer.run_dir=$RUN_DIR")
    [[ -n ${COVRL_MODEL:-} ]] && OVERRIDES+=("policy.model_path=$COVRL_MODEL")
    [[ -n ${COVRL_TRAIN_FILES:-} ]] && OVERRIDES+=("data.train_files=[$COVRL_TRAIN_FILES]")
    [[ -n ${COVRL_VAL_FILES:-} ]] && OVERRIDES+=("data.val_files=[$COVRL_VAL_FILES]")
    OVERRIDES+=("$@")  # command-line overrides win
    ARGS=(--config "$COVRL_CONFIG" --resume "${COVRL_RESUME:-auto}" "${OVERRIDES[@]}")
else
    (($# > 0)) || { echo "launch.sh: set COVRL_CONFIG or name a program" >&2; exit 2; }
    RUN_DIR=${COVRL_RUN_DIR:-${COVRL_OUTPUT:-$COVRL_HOME/outputs}/$JOB_NAME-$JOB_ID}
    PROGRAM=("$1")
    shift
    ARGS=("$@")
fi
LOG_DIR=$RUN_DIR/logs

TORCHRUN=("$COVRL_TORCHRUN"
    --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE"
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_ID.$ATTEMPT"
    --max-restarts=0 --shutdown-timeout="${COVRL_SHUTDOWN_TIMEOUT:-600}"
    "${PROGRAM[@]}" "${ARGS[@]}")

echo "covrl launch: job $JOB_ID attempt $ATTEMPT, $NNODES node(s) x $NPROC_PER_NODE rank(s)," \
    "backend $BACKEND, rendezvous c10d at $MASTER_ADDR:$MASTER_PORT"
echo "covrl launch: nodes ${NODES[*]}; run dir $RUN_DIR; node logs $LOG_DIR/$JOB_ID.$ATTEMPT.node<i>.log"

if [[ ${COVRL_DRY_RUN:-0} == 1 ]]; then
    echo "backend environment:"
    for v in "${BACKEND_VARS[@]}"; do [[ -n ${!v:-} ]] && echo "  $v=${!v}"; done
    echo "torchrun command per node (one srun task each):"
    for node in "${NODES[@]}"; do
        printf '  [%s] %s\n' "$node" "$(printf '%q ' "${TORCHRUN[@]}")"
    done
    if [[ -n ${COVRL_CONFIG:-} ]]; then
        # A python without covrl (or its packages) gets one line, not a traceback.
        errors=$(mktemp)
        rc=0
        "$COVRL_PYTHON" -m covrl.scaling --config "$COVRL_CONFIG" --nodes "$NNODES" \
            --gpus-per-node "$NPROC_PER_NODE" --gpu-memory-gib "${COVRL_GPU_MEMORY_GIB:-80}" \
            "${OVERRIDES[@]}" 2>"$errors" || rc=$?
        if ((rc != 0)) && grep -q '^ModuleNotFoundError' "$errors"; then
            echo "launch.sh: $COVRL_PYTHON: $(grep '^ModuleNotFoundError' "$errors" | tail -n 1):" \
                "run \`make install\` (creates .venv in $COVRL_HOME), activate the environment" \
                "covrl is installed in, or set COVRL_PYTHON" >&2
        else
            cat "$errors" >&2
        fi
        rm -f "$errors"
        exit "$rc"
    fi
    exit $?
fi
in_slurm || { echo "launch.sh: not inside a Slurm job (use sbatch, or COVRL_DRY_RUN=1)" >&2; exit 2; }

mkdir -p "$LOG_DIR"
# torchrun ignores USR1 (its default action would kill it); the trainer ranks install
# their own handler, which replaces the inherited "ignore".
SRUN=(srun --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"
    --kill-on-bad-exit=1 --output="$LOG_DIR/$JOB_ID.$ATTEMPT.node%n.log"
    bash -c 'trap "" USR1; exec "$@"' covrl-node "${TORCHRUN[@]}")

PREEMPT_SIGNAL=""
forward_usr1() {
    PREEMPT_SIGNAL=USR1
    echo "covrl launch: USR1 received (time limit near): asking the ranks to checkpoint"
    [[ -n ${SRUN_PID:-} ]] && kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
note_term() {
    PREEMPT_SIGNAL=${PREEMPT_SIGNAL:-TERM}
    echo "covrl launch: TERM received: the ranks checkpoint at the next step boundary"
}
trap forward_usr1 USR1
trap note_term TERM

"${SRUN[@]}" &
SRUN_PID=$!
RC=0
while :; do
    wait "$SRUN_PID" && RC=0 || RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # else a trapped signal interrupted `wait`
done
echo "covrl launch: ranks finished with exit code $RC"

if [[ $PREEMPT_SIGNAL == USR1 && $RC == 0 ]] &&
    grep -qs "preempted: checkpoint saved at step" "$LOG_DIR/$JOB_ID.$ATTEMPT".*.log; then
    echo "covrl launch: requeueing job $JOB_ID; it resumes from the checkpoint"
    scontrol requeue "$JOB_ID"
fi
exit "$RC"
