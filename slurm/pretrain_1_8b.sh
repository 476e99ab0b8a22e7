#!/usr/bin/env bash
# Pre-train POLAR-1.8B (paper: 0.94T tokens on 320 H800 GPUs, ~57 h): 40 nodes x 8 GPUs,
# initialised from InternLM2.5-1.8B, one epoch of the policy-discrimination triplets.
#
#   mkdir -p logs   # Slurm does not create the directory of --output
#   DATA_PATH=/data/polar/pretrain/bin/polar CKPT_DIR=/ckpt/polar-1_8b-pretrain \
#       PRETRAINED=/ckpt/internlm2_5-1_8b-mcore TOKENIZER=/models/internlm2_5-1_8b \
#       IMAGE=/shared/images/polar.sqsh sbatch slurm/pretrain_1_8b.sh
#   DRY_RUN=1 bash slurm/pretrain_1_8b.sh   # print the layout and each node's command, run nothing
#
# Environment variables, the container image and the requeue logic: slurm/common.sh.
# Parallel layout and its memory arithmetic: examples/pretrain_1_8b.yaml
# (TP=1 PP=1, DP=320: the whole model and 24k-token activations fit one GPU).
#
# Time limit and restarts: Slurm sends USR1 to this script 300 s before the limit; the
# trainer then writes a checkpoint and the job requeues itself, resuming from CKPT_DIR.
# --open-mode=append keeps every restart's output in one log.
#SBATCH --job-name=polar-pt-1_8b
#SBATCH --nodes=40
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail
# Under sbatch this file runs from a copy in Slurm's spool directory, so the repository is
# the submission directory (submit from the repository root) unless REPO says otherwise.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
CONFIG=examples/pretrain_1_8b.yaml
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
polar_launch
