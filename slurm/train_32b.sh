#!/usr/bin/env bash
#SBATCH --job-name=covrl-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# USR1 30 min before the time limit: longer than one 32B RL step plus a checkpoint save.
#SBATCH --signal=B:USR1@1800
#
# Qwen2.5-32B with the paper's 32B KL-Cov recipe (examples/qwen2.5-32b_kl_cov.yaml):
# 4 nodes x 8 GPUs (80 GB), training TP=8 (SP) x PP=2 x DP=2, vLLM TP=4; docs/scaling.md
# explains the layout and its per-GPU memory.
#
#   sbatch slurm/train_32b.sh [key.sub=value ...]        # from the repository root
#   COVRL_DRY_RUN=1 sbatch slurm/train_32b.sh            # print the plan, launch nothing
#   COVRL_DRY_RUN=1 bash slurm/train_32b.sh              # the same, without Slurm
#
# Environment overrides (sbatch passes your environment to the job):
#   COVRL_CONFIG       run config (default examples/qwen2.5-32b_kl_cov.yaml; the other
#                      methods: ..._grpo, ..._clip_higher, ..._clip_cov)
#   COVRL_MODEL        Hugging Face checkpoint directory of the base model
#   COVRL_TRAIN_FILES  comma-separated training parquet files (DAPO-Math-17k layout)
#   COVRL_VAL_FILES    comma-separated validation parquet files
#   COVRL_OUTPUT       root of run directories (default ./outputs); COVRL_RUN_DIR: exact dir
#   COVRL_NPROC_PER_NODE, COVRL_MASTER_PORT, COVRL_RESUME, ...: see slurm/launch.sh
# Any config key: append key.sub=value arguments, e.g. policy.optim.lr=5e-7.
# Other sizes: sbatch --nodes=N ... (keep N x 8 divisible by TP x PP = 32).
export COVRL_CONFIG=${COVRL_CONFIG:-examples/qwen2.5-32b_kl_cov.yaml}
export COVRL_DEFAULT_NODES=4 COVRL_DEFAULT_GPUS_PER_NODE=8  # for dry runs outside Slurm
exec bash "${COVRL_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/launch.sh" "$@"
