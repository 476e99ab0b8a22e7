#!/usr/bin/env bash
# Fine-tune POLAR-1.8B on 150K ranked triplets (paper: one epoch on 16 H800 GPUs, ~0.5 h):
# 2 nodes x 8 GPUs, initialised from the pre-trained reward model.
#
#   mkdir -p logs   # Slurm does not create the directory of --output
#   DATA_PATH=/data/polar/sft/bin/polar-sft CKPT_DIR=/ckpt/polar-1_8b-sft \
#       PRETRAINED=/ckpt/polar-1_8b-pretrain TOKENIZER=/models/internlm2_5-1_8b \
#       IMAGE=/shared/images/polar.sqsh sbatch slurm/sft_1_8b.sh
#   DRY_RUN=1 bash slurm/sft_1_8b.sh   # print the layout and each node's command, run nothing
#
# Environment variables, the container image and the requeue logic: slurm/common.sh.
# Parallel layout and its memory arithmetic: examples/sft_1_8b.yaml
# (TP=1 PP=1, DP=16, 6 layers recomputed at 32k tokens).
#
# Time limit and restarts: Slurm sends USR1 to this script 300 s before the limit; the
# trainer then writes a checkpoint and the job requeues itself, resuming from CKPT_DIR.
# --open-mode=append keeps every restart's output in one log.
#SBATCH --job-name=polar-sft-1_8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail
# Under sbatch this file runs from a copy in Slurm's spool directory, so the repository is
# the submission directory (submit from the repository root) unless REPO says otherwise.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
CONFIG=examples/sft_1_8b.yaml
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
polar_launch
