#!/usr/bin/env bash
# Sample POLAR pre-training trajectories on a GPU cluster: one Slurm array task per
# (policy, shard) pair, one GPU each. Task T runs policy T / NUM_SHARDS (the pool file's
# policies in line order, from 0) on shard T % NUM_SHARDS. A task that runs again (requeue,
# time limit, resubmitting the same array) resumes its shard; finished shards are skipped.
#
#   # 1. once, on any machine: the prompt set that every task reads (tasks would otherwise
#   #    all build it, identically, at the same time)
#   python tools/sample_trajectories.py --policies pool.txt --output /data/gen \
#       --corpus '/data/corpus/*.jsonl.gz' --num-prompts 200000 \
#       --instructions /data/sft/prompts.jsonl --prompts-only
#   # 2. P policies x 16 shards, at most 64 GPUs at a time, same prompt settings:
#   POLICIES=pool.txt OUTPUT=/data/gen NUM_SHARDS=16 CORPUS='/data/corpus/*.jsonl.gz' \
#   NUM_PROMPTS=200000 INSTRUCTIONS=/data/sft/prompts.jsonl \
#       sbatch --array=0-$((P * 16 - 1))%64 slurm/sample_trajectories_array.sh [more flags]
#   # 3. python tools/build_triplets.py --from-trajectories --input '/data/gen/*/*.jsonl' ...
#
# Environment: POLICIES, OUTPUT, NUM_SHARDS (required); CORPUS (files or globs, split on
# spaces) with NUM_PROMPTS, INSTRUCTIONS; EXTRA_ARGS (more flags, split on spaces; arguments
# given to the script come after them); PYTHON (default python3, an environment with
# transformers, and vllm for --backend auto to use it); REPO (default: the submit directory,
# so submit from the repository root); DRY_RUN=1 prints the command instead of running it.
#
#SBATCH --job-name=polar-sample
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

: "${POLICIES:?set POLICIES to the policy pool file}"
: "${OUTPUT:?set OUTPUT to the output directory}"
: "${NUM_SHARDS:?set NUM_SHARDS to the number of prompt shards}"
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PYTHON=${PYTHON:-python3}

[[ -f $POLICIES ]] || { echo "${0##*/}: policy pool file $POLICIES not found" >&2; exit 1; }
[[ $NUM_SHARDS =~ ^[1-9][0-9]*$ ]] ||
    { echo "${0##*/}: NUM_SHARDS is '$NUM_SHARDS', expected a positive integer" >&2; exit 1; }
# Policies are the lines that are neither blank nor comments, as the tool reads them.
num_policies=$(grep -cvE '^[[:space:]]*(#|$)' "$POLICIES" || true)
tasks=$((num_policies * NUM_SHARDS))
if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "${0##*/}: submit with sbatch --array=0-$((tasks - 1)) ($num_policies policies x" \
        "$NUM_SHARDS shards)" >&2
    exit 1
fi
task=$SLURM_ARRAY_TASK_ID
if ((task >= tasks)); then
    echo "${0##*/}: task $task is beyond the $tasks (policy, shard) pairs;" \
        "use --array=0-$((tasks - 1))" >&2
    exit 1
fi
policy=$((task / NUM_SHARDS))
shard=$((task % NUM_SHARDS))

# Globs stay unexpanded here (read does not glob): the tool expands them itself.
prompt_args=()
if [[ -n ${CORPUS:-} ]]; then
    read -ra corpus <<< "$CORPUS"
    prompt_args+=(--corpus "${corpus[@]}" --num-prompts "${NUM_PROMPTS:?set NUM_PROMPTS with CORPUS}")
fi
if [[ -n ${INSTRUCTIONS:-} ]]; then
    read -ra instructions <<< "$INSTRUCTIONS"
    prompt_args+=(--instructions "${instructions[@]}")
fi
read -ra extra <<< "${EXTRA_ARGS:-}"
cmd=("$PYTHON" "$REPO/tools/sample_trajectories.py" --policies "$POLICIES" --output "$OUTPUT"
     --num-shards "$NUM_SHARDS" --shard-index "$shard" --policy "$policy" --quiet
     "${prompt_args[@]}" "${extra[@]}" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
echo "task $task: policy $policy, shard $shard of $NUM_SHARDS"
exec "${cmd[@]}"
