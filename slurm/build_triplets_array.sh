#!/usr/bin/env bash
# Tokenize POLAR triplets on many nodes: one Slurm array task per partition of the input lines,
# then one merge. Partitions are contiguous line ranges, so the merged dataset is byte-identical
# to a single-process build.
#
#   INPUT='/data/polar/*.jsonl.gz' OUTPUT=/data/polar/bin/polar TOKENIZER=/models/POLAR-7B \
#       sbatch --array=0-63 slurm/build_triplets_array.sh
#   # after all tasks: python tools/merge_triplets.py --inputs /data/polar/bin/polar.part{0..63} \
#   #     --output-prefix /data/polar/bin/polar
#
#SBATCH --job-name=polar-build
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

: "${INPUT:?set INPUT to the JSONL files or glob}"
: "${OUTPUT:?set OUTPUT to the output prefix}"
: "${TOKENIZER:?set TOKENIZER to a sentencepiece model or HF tokenizer directory}"
PARTS=${SLURM_ARRAY_TASK_COUNT:-1}
INDEX=${SLURM_ARRAY_TASK_ID:-0}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-8}}
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-python3}

# INPUT may hold several globs: split on spaces but leave the globs to the tool itself.
read -ra inputs <<< "$INPUT"
read -ra extra <<< "${EXTRA_ARGS:-}"
cmd=("$PYTHON" "$REPO/tools/build_triplets.py" --input "${inputs[@]}"
     --output-prefix "$OUTPUT.part$INDEX" --tokenizer "$TOKENIZER" --workers "$WORKERS"
     --partitions "$PARTS" --partition-index "$INDEX" "${extra[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
mkdir -p "$(dirname "$OUTPUT")"
exec "${cmd[@]}"
