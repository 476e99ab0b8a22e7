#!/usr/bin/env bash
# Pre-train POLAR-7B (paper: 3.6T tokens on 912 H800 GPUs, ~175 h): 114 nodes x 8 GPUs,
# initialised from InternLM2.5-7B, one epoch of the policy-discrimination triplets. At a
# 48 h limit the run takes about four jobs' worth of requeues.
#
#   mkdir -p logs   # Slurm does not create the directory of --output
#   DATA_PATH=/data/polar/pretrain/bin/polar CKPT_DIR=/ckpt/polar-7b-pretrain \
#       PRETRAINED=/ckpt/internlm2_5-7b-mcore TOKENIZER=/models/internlm2_5-7b \
#       IMAGE=/shared/images/polar.sqsh sbatch slurm/pretrain_7b.sh
#   DRY_RUN=1 bash slurm/pretrain_7b.sh   # print the layout and each node's command, run nothing
#
# Environment variables, the container image and the requeue logic: slurm/common.sh.
# Parallel layout and its memory arithmetic: examples/pretrain_7b.yaml
# (TP=2 + sequence parallel, PP=1, DP=456).
#
# Time limit and restarts: Slurm sends USR1 to this script 300 s before the limit; the
# trainer then writes a checkpoint and the job requeues itself, resuming from CKPT_DIR.
# --open-mode=append keeps every restart's output in one log.
#SBATCH --job-name=polar-pt-7b
#SBATCH --nodes=114
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
CONFIG=examples/pretrain_7b.yaml
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"
polar_launch
