#!/usr/bin/env bash
# PPO with NeMo-Aligner and a POLAR reward, as one heterogeneous Slurm job:
#   component 0: one node running `python -m megatron_polar.serving --critic` (the POLAR reward
#                and the PPO critic, NeMo-Aligner's combine_rm_and_critic_server=True);
#   component 1: ACTOR nodes running NeMo-Aligner's train_gpt_ppo_actor.py, which send their
#                rollouts to component 0 (examples/rlhf/nemo_aligner/, docs/rlhf.md).
#
#   python tools/make_rlhf_prompts.py --input rlhf.jsonl --output-dir /data/prompts   # once
#   POLAR_MODEL=/models/POLAR-7B-mine PROMPT_DIR=/data/prompts ACTOR_CHECKPOINT=/models/actor.nemo \
#   NEMO_ALIGNER_DIR=/opt/NeMo-Aligner RESULTS=/results/ppo \
#       sbatch slurm/ppo_nemo_aligner.sh
#
# Environment: POLAR_MODEL (HF directory, or a megatron checkpoint of ours), PROMPT_DIR (train,
# validation and references.jsonl from make_rlhf_prompts.py), ACTOR_CHECKPOINT (.nemo),
# NEMO_ALIGNER_DIR (a NeMo-Aligner v0.7.0 checkout), RESULTS (required); ACTOR_TOKENIZER
# (default: the reward model's), SERVER_PORT (5567), SERVER_TP (GPUs of the server, default 1;
# more needs a megatron checkpoint), EXTRA_SERVER_ARGS, EXTRA_ACTOR_ARGS (split on spaces),
# PYTHON (python3), REPO (the submit directory), ACTOR_NODES and ACTOR_GPUS_PER_NODE (8 and 8:
# what DRY_RUN shows; under Slurm the allocation of component 1 decides, so change the
# #SBATCH lines below to change it). DRY_RUN=1 prints the layout and both commands.
#
#SBATCH --job-name=polar-ppo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH hetjob
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8

set -euo pipefail

: "${POLAR_MODEL:?set POLAR_MODEL to the POLAR model, an HF directory or a checkpoint}"
: "${PROMPT_DIR:?set PROMPT_DIR to the output of tools/make_rlhf_prompts.py}"
: "${ACTOR_CHECKPOINT:?set ACTOR_CHECKPOINT to the .nemo checkpoint of the actor}"
: "${NEMO_ALIGNER_DIR:?set NEMO_ALIGNER_DIR to a NeMo-Aligner v0.7.0 checkout}"
: "${RESULTS:?set RESULTS to the output directory}"
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
PYTHON=${PYTHON:-python3}
SERVER_PORT=${SERVER_PORT:-5567}
SERVER_TP=${SERVER_TP:-1}
EXAMPLES=$REPO/examples/rlhf/nemo_aligner

for f in train.jsonl validation.jsonl references.jsonl; do
    [[ -f $PROMPT_DIR/$f || ${DRY_RUN:-0} == 1 ]] ||
        { echo "${0##*/}: $PROMPT_DIR/$f not found (tools/make_rlhf_prompts.py)" >&2; exit 1; }
done
# An exported HF directory has a config.json; anything else is one of our checkpoints.
if [[ -f $POLAR_MODEL/config.json ]]; then model_arg=(--hf "$POLAR_MODEL")
else model_arg=(--checkpoint "$POLAR_MODEL"); fi

# The actors reach the server by the first hostname of component 0.
if [[ -n ${SLURM_JOB_NODELIST_HET_GROUP_0:-} ]]; then
    critic_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n 1)
else
    critic_host=CRITIC_HOST  # outside Slurm (DRY_RUN): a placeholder
fi
actor_nodes=${SLURM_JOB_NUM_NODES_HET_GROUP_1:-${ACTOR_NODES:-8}}
actor_gpus=${SLURM_GPUS_PER_NODE_HET_GROUP_1:-${ACTOR_GPUS_PER_NODE:-8}}
# The actors' own rendezvous: Lightning takes MASTER_ADDR if set, else the first host of
# SLURM_NODELIST, which in a heterogeneous job may be the server's node; name it explicitly.
if [[ -n ${SLURM_JOB_NODELIST_HET_GROUP_1:-} ]]; then
    actor_master=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | head -n 1)
else
    actor_master=ACTOR_HOST  # outside Slurm (DRY_RUN): a placeholder
fi

read -ra extra_server <<< "${EXTRA_SERVER_ARGS:-}"
read -ra extra_actor <<< "${EXTRA_ACTOR_ARGS:-}"
tokenizer_arg=()
[[ -n ${ACTOR_TOKENIZER:-} ]] && tokenizer_arg=(--actor-tokenizer "$ACTOR_TOKENIZER")
# --host 0.0.0.0: the actors run on other nodes, so the server must listen beyond localhost
# (its default, kept everywhere else); it has no authentication, so keep the cluster network
# private. --critic is in the config file too; repeated here so the command says what it runs.
server_cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$SERVER_TP"
            -m megatron_polar.serving --config "$EXAMPLES/polar_critic_server.yaml"
            "${model_arg[@]}" --tensor-model-parallel-size "$SERVER_TP"
            --references "$PROMPT_DIR/references.jsonl" "${tokenizer_arg[@]}"
            --host 0.0.0.0 --port "$SERVER_PORT" --critic --critic-save "$RESULTS/critic"
            "${extra_server[@]}")
data_prefix="{train: [$PROMPT_DIR/train.jsonl], validation: [$PROMPT_DIR/validation.jsonl],"
data_prefix+=" test: [$PROMPT_DIR/validation.jsonl]}"
actor_cmd=("$PYTHON" "$NEMO_ALIGNER_DIR/examples/nlp/gpt/train_gpt_ppo_actor.py"
           --config-path "$EXAMPLES" --config-name ppo_actor_polar
           "hydra.searchpath=[file://$NEMO_ALIGNER_DIR/examples/nlp/gpt/conf]"
           "trainer.num_nodes=$actor_nodes" "trainer.devices=$actor_gpus"
           "pretrained_checkpoint.restore_from_path=$ACTOR_CHECKPOINT"
           "model.data.data_prefix=$data_prefix"
           "remote_critic_rm.critic.ip=$critic_host" "remote_critic_rm.critic.port=$SERVER_PORT"
           "remote_critic_rm.reward_model.ip=$critic_host"
           "remote_critic_rm.reward_model.port=$SERVER_PORT"
           "exp_manager.explicit_log_dir=$RESULTS/actor" "${extra_actor[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "layout: component 0 = 1 node, server on $critic_host:$SERVER_PORT (TP=$SERVER_TP);" \
        "component 1 = $actor_nodes actor nodes x $actor_gpus GPUs"
    printf 'component 0: '; printf '%q ' "${server_cmd[@]}"; echo
    printf 'component 1: '; printf '%q ' "${actor_cmd[@]}"; echo
    echo "component 1 environment: MASTER_ADDR=$actor_master"
    exit 0
fi

mkdir -p "$RESULTS"
cd "$REPO"
srun --het-group=0 --ntasks=1 --gpus-per-task="$SERVER_TP" "${server_cmd[@]}" &
server=$!
# NeMo-Aligner's client waits for the server (init_timeout_s), so the actors can start now.
status=0
MASTER_ADDR=$actor_master srun --het-group=1 "${actor_cmd[@]}" || status=$?
kill -TERM "$server" 2> /dev/null || true
wait "$server" || true
exit "$status"
