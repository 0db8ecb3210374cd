#!/usr/bin/env bash
#SBATCH --job-name=covrl-convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --output=slurm-%x-%j.out
#
# tools/convert_checkpoint.py on a cluster: one torchrun per node (slurm/launch.sh),
# COVRL_NPROC_PER_NODE ranks each (default: the node's GPUs). The ranks form
# tensor x pipeline parallel groups of --tp x --pp; ranks beyond that are data-parallel
# copies that only repeat the work, so ask for nodes x ranks = tp x pp.
#
#   # Hugging Face -> Megatron (reshardable: load it later at any TP/PP)
#   sbatch slurm/convert_checkpoint.sh hf-to-megatron --hf models/Qwen2.5-32B \
#       --out ckpt/qwen32b --tp 8 --pp 1
#   # Megatron checkpoint of a run -> Hugging Face (for evaluation or vLLM)
#   sbatch slurm/convert_checkpoint.sh megatron-to-hf \
#       --ckpt outputs/covrl-32b-1234/checkpoints --out hf/qwen32b-step100 --tp 8 --pp 1
#   COVRL_NPROC_PER_NODE=4 sbatch slurm/convert_checkpoint.sh ... --tp 2 --pp 2
#
# Environment: COVRL_HOME (repository root, default the submit directory), COVRL_OUTPUT /
# COVRL_RUN_DIR (where node logs go: <run dir>/logs), COVRL_DRY_RUN=1 (print the torchrun
# command per node, launch nothing); the rest as in slurm/launch.sh.
unset COVRL_CONFIG  # tool mode: launch.sh runs the program given below
exec bash "${COVRL_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}/slurm/launch.sh" tools/convert_checkpoint.py "$@"
