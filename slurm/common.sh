# shellcheck shell=bash
# Shared body of the POLAR training launchers (slurm/pretrain_*.sh, slurm/sft_*.sh).
#
# A launcher holds its #SBATCH header, sets REPO and CONFIG (a YAML under examples/,
# relative to REPO), sources this file and calls polar_launch. The parallel layout lives in
# the YAML only; this file reads TP/PP/CP from it (and from EXTRA_ARGS, which override it on
# the trainer's command line too), so the printed layout cannot disagree with the launch.
#
# Environment (all optional in DRY_RUN mode, where placeholders are used):
#   DATA_PATH    required: trainer --data-path, a dataset prefix or "w1 prefix1 w2 prefix2 ..."
#   CKPT_DIR     required: --save and --load. A (re)started job resumes from the newest
#                complete checkpoint here; PRETRAINED is only read while there is none.
#   PRETRAINED   required: initial weights, a megatron dist checkpoint (HF InternLM2.5 or
#                POLAR-Base imported, or the pre-training run's checkpoint for SFT)
#   TOKENIZER    required: sentencepiece model or HF tokenizer directory the data was built with
#   IMAGE        container image (default nvcr.io#nvidia/pytorch:25.09-py3, see below)
#   MOUNTS       pyxis --container-mounts (default: REPO, CKPT_DIR, TENSORBOARD_DIR and the
#                parent directories of the data, tokenizer and initial weights, each at its
#                own path; relative paths resolve inside REPO, the container's workdir)
#   EXTRA_ARGS   more trainer flags, split on whitespace; they come last and override the YAML
#   TENSORBOARD_DIR  default CKPT_DIR/tensorboard
#   MASTER_PORT  rendezvous port on the first node (default 29500)
#   SHUTDOWN_GRACE   seconds torchrun gives its workers to checkpoint after SIGTERM (default 240)
#   MAX_REQUEUES stop requeueing once the job has restarted this many times (default 100)
#   DRY_RUN=1    print the layout and every node's command; start nothing
#
# The image: NGC PyTorch images carry CUDA torch, Transformer Engine and apex but not
# megatron-core or sentencepiece. Add them once and save a squashfs for IMAGE, e.g.
#   srun -N1 --container-image='nvcr.io#nvidia/pytorch:25.09-py3' \
#       --container-save=/shared/images/polar.sqsh \
#       pip install --no-deps megatron-core==0.16.1 sentencepiece
# (--no-deps keeps the image's own torch). A local squashfs also spares every node of a
# 114-node job from pulling the image from the registry at start-up.

POLAR_DEFAULT_IMAGE='nvcr.io#nvidia/pytorch:25.09-py3'

polar_die() {
    echo "${0##*/}: $*" >&2
    exit 1
}

# Value of a top-level key of a flat YAML file (dashes and underscores are the same, as in
# the trainer), or $3 when the key is absent or null. The example configs are flat on
# purpose so that this stays a one-screen awk program.
polar_yaml_value() {
    awk -v want="${2//_/-}" -v def="$3" '
        /^[A-Za-z0-9_-]+[[:space:]]*:/ {
            k = $0; sub(/[[:space:]]*:.*/, "", k); gsub(/_/, "-", k)
            if (k != want) next
            v = $0; sub(/^[^:]*:[[:space:]]*/, "", v); sub(/[[:space:]]+#.*$/, "", v)
            sub(/[[:space:]]+$/, "", v); gsub(/^["\047]|["\047]$/, "", v)
            found = 1; value = v
        }
        END { print (!found || value == "" || value == "null" || value == "~") ? def : value }
    ' "$1"
}

# The launcher's own "#SBATCH --NAME=VALUE": the one place its job size is written down.
polar_sbatch_value() {
    sed -n "/^#SBATCH --$1=/{s/^#SBATCH --$1=\\([^[:space:]]*\\).*/\\1/p;q;}" "$0"
}

# Last value of trainer flag --$1 among the words of POLAR_EXTRA (as argparse would take
# it), else $2.
polar_extra_value() {
    local name=$1 value=$2 i word
    for ((i = 0; i < ${#POLAR_EXTRA[@]}; i++)); do
        word=${POLAR_EXTRA[i]//_/-}
        case $word in
            "--$name") value=${POLAR_EXTRA[i + 1]:-} ;;
            "--$name="*) value=${word#*=} ;;
        esac
    done
    printf '%s\n' "$value"
}

polar_layout_value() {
    polar_extra_value "$1" "$(polar_yaml_value "$REPO/$CONFIG" "$1" 1)"
}

# "src:src" for each distinct absolute path, comma-separated.
polar_default_mounts() {
    local -A seen=()
    local -a out=()
    local p
    for p in "$@"; do
        [[ $p == /* && -z ${seen[$p]:-} ]] || continue
        seen[$p]=1
        out+=("$p:$p")
    done
    local IFS=,
    printf '%s\n' "${out[*]}"
}

polar_job_state() {
    scontrol show job "$SLURM_JOB_ID" 2> /dev/null |
        sed -n '/JobState=/{s/.*JobState=\([A-Z_]*\).*/\1/p;q;}'
}

# Signal handler of the batch shell. USR1 is our own warning before the time limit
# (#SBATCH --signal=B:USR1@...), sent to this shell only: pass it on to the training step
# as SIGTERM, on which the trainer saves a checkpoint and exits 0. scancel without --batch
# signals every process of the job's steps on every node (torchrun and its workers) and not
# this shell; signalling srun itself would not do, as srun answers SIGTERM by killing its
# tasks. A SIGTERM to this shell (pre-emption, scancel) reaches the steps from Slurm
# directly; sending another would cut torchrun's grace period short, because torchrun
# aborts its graceful shutdown on a second signal.
polar_on_signal() {
    echo "$(date -u +%FT%TZ) ${0##*/}: got SIG$1, the trainer checkpoints and stops" >&2
    POLAR_STOP=$1
    if [[ $1 == USR1 ]]; then
        scancel --signal=TERM "$SLURM_JOB_ID" ||
            echo "${0##*/}: scancel --signal=TERM failed" >&2
    fi
}

polar_launch() {
    local dry=${DRY_RUN:-0}
    [[ -n ${CONFIG:-} && -n ${REPO:-} ]] || polar_die "the launcher must set REPO and CONFIG"
    [[ -f $REPO/$CONFIG ]] ||
        polar_die "$REPO/$CONFIG not found (submit from the repository root or set REPO)"

    if [[ $dry == 1 ]]; then
        local run=${CONFIG##*/}
        : "${DATA_PATH:=/dry-run/data/polar}" "${CKPT_DIR:=/dry-run/checkpoints/${run%.yaml}}"
        : "${PRETRAINED:=/dry-run/pretrained}" "${TOKENIZER:=/dry-run/tokenizer}"
    else
        [[ -n ${SLURM_JOB_ID:-} ]] || polar_die "submit with sbatch (or set DRY_RUN=1)"
    fi
    : "${DATA_PATH:?set DATA_PATH to the triplet dataset prefix (or a blend: w1 p1 w2 p2 ...)}"
    : "${CKPT_DIR:?set CKPT_DIR to the checkpoint directory of this run (saved to, resumed from)}"
    : "${PRETRAINED:?set PRETRAINED to the initial weights (megatron dist checkpoint)}"
    : "${TOKENIZER:?set TOKENIZER to the tokenizer the data was built with}"

    local -a data
    read -r -a data <<< "$DATA_PATH"
    read -r -a POLAR_EXTRA <<< "${EXTRA_ARGS:-}"

    # Job size: Slurm's figures inside a job, else the launcher's own #SBATCH lines.
    local nodes gpus tp pp cp world dp v
    nodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-$(polar_sbatch_value nodes)}}
    gpus=${SLURM_GPUS_ON_NODE:-$(polar_sbatch_value gpus-per-node)}
    tp=$(polar_layout_value tensor-model-parallel-size)
    pp=$(polar_layout_value pipeline-model-parallel-size)
    cp=$(polar_layout_value context-parallel-size)
    for v in nodes gpus tp pp cp; do
        [[ ${!v} =~ ^[1-9][0-9]*$ ]] || polar_die "$v is '${!v}', expected a positive integer"
    done
    world=$((nodes * gpus))
    ((world % (tp * pp * cp) == 0)) ||
        polar_die "WORLD_SIZE $world is not a multiple of TP*PP*CP = $tp*$pp*$cp"
    # TP exchanges activations inside every layer; across nodes it would run on the network.
    ((gpus % tp == 0)) || polar_die "TP=$tp does not divide the $gpus GPUs of a node"
    dp=$((world / (tp * pp * cp)))

    local -a hosts=()
    local i
    if [[ -n ${SLURM_JOB_NODELIST:-} ]] && command -v scontrol > /dev/null; then
        mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else
        for ((i = 0; i < nodes; i++)); do hosts+=("$(printf 'dryrun-node%03d' "$i")"); done
    fi
    ((${#hosts[@]} == nodes)) || polar_die "$nodes nodes but ${#hosts[@]} hostnames"
    local master=${hosts[0]} port=${MASTER_PORT:-29500}

    local image=${IMAGE:-$POLAR_DEFAULT_IMAGE} mounts tb
    tb=${TENSORBOARD_DIR:-$CKPT_DIR/tensorboard}
    local -a mount_dirs=("$REPO" "$CKPT_DIR" "$tb" "$(dirname "$PRETRAINED")"
                         "$(dirname "$TOKENIZER")")
    for v in "${data[@]}"; do
        [[ $v =~ ^[0-9.eE+-]+$ ]] || mount_dirs+=("$(dirname "$v")")  # skip blend weights
    done
    mounts=${MOUNTS:-$(polar_default_mounts "${mount_dirs[@]}")}

    # Inherited by the srun step and, through pyxis, by the container.
    local -a envs=(
        "PYTHONPATH=$REPO"
        # Keep ~/.local site-packages out of the container's Python.
        "PYTHONNOUSERSITE=1"
        # One hardware queue per GPU: kernels start in issue order, so the TP / sequence
        # parallel collectives megatron issues ahead of the GEMMs they feed overlap as planned.
        "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
        # Packs differ in length every micro-batch; growable segments avoid the fragmentation
        # that fixed-size cached blocks suffer from such shapes.
        "PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
        # torchrun sends SIGKILL this long after forwarding SIGTERM; the default 30 s is too
        # short to finish a step and write a checkpoint. Older torch builds ignore the
        # variable and keep 30 s: the periodic checkpoints are the fallback there.
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_GRACE:-240}"
    )

    # One srun task per node, each running torchrun for the node's GPUs. The c10d rendezvous
    # on the first node assigns node ranks as nodes join, so every node runs the same
    # command (torchrun ignores --node-rank for this backend). The long join timeout covers
    # nodes that take minutes to start the container.
    local -a cpus_arg=()
    [[ -n ${SLURM_CPUS_ON_NODE:-} ]] && cpus_arg=("--cpus-per-task=$SLURM_CPUS_ON_NODE")
    local -a srun_cmd=(
        # Without --cpus-per-task a one-task-per-node step may be bound to a single core.
        srun --nodes="$nodes" --ntasks-per-node=1 "${cpus_arg[@]}" --kill-on-bad-exit=1
        --container-image="$image" --container-mounts="$mounts" --container-workdir="$REPO"
        --no-container-mount-home
    )
    local -a node_cmd=(
        torchrun --nnodes "$nodes" --nproc-per-node "$gpus"
        --rdzv-backend c10d --rdzv-endpoint "$master:$port" --rdzv-id "${SLURM_JOB_ID:-dryrun}"
        --rdzv-conf join_timeout=1800
        -m megatron_polar.train --config "$CONFIG"
        --save "$CKPT_DIR" --load "$CKPT_DIR" --pretrained-checkpoint "$PRETRAINED"
        --data-path "${data[@]}" --tokenizer "$TOKENIZER" --tensorboard-dir "$tb"
        "${POLAR_EXTRA[@]}"
    )

    echo "NODES=$nodes GPUS_PER_NODE=$gpus WORLD_SIZE=$world TP=$tp PP=$pp CP=$cp DP=$dp"
    if [[ $dry == 1 ]]; then
        echo "hosts: ${hosts[*]}"
        printf 'env: '; printf '%q ' "${envs[@]}"; echo
        printf 'srun: '; printf '%q ' "${srun_cmd[@]}"; echo
        for ((i = 0; i < nodes; i++)); do
            printf 'node %d: ' "$i"; printf '%q ' "${node_cmd[@]}"; echo
        done
        return 0
    fi

    mkdir -p "$CKPT_DIR" "$tb"
    export "${envs[@]}"
    printf 'launch: '; printf '%q ' "${srun_cmd[@]}" "${node_cmd[@]}"; echo

    # srun runs in the background because bash runs a trap only once the foreground command
    # ends: with srun in the foreground the time-limit warning would wait for the time limit.
    POLAR_STOP=
    trap 'polar_on_signal USR1' USR1
    trap 'polar_on_signal TERM' TERM
    "${srun_cmd[@]}" "${node_cmd[@]}" &
    local pid=$! rc=0 again
    # A trapped signal ends `wait` early (status > 128) while srun still runs: wait again.
    while :; do
        if wait "$pid"; then rc=0; else rc=$?; fi
        kill -0 "$pid" 2> /dev/null || break
    done
    # If the signal came just as srun ended, its status has not been reported yet.
    if ((rc > 128)); then
        if wait "$pid"; then again=0; else again=$?; fi
        ((again == 127)) || rc=$again
    fi
    trap - USR1 TERM
    echo "$(date -u +%FT%TZ) ${0##*/}: training step ended with status $rc" >&2

    # Requeue only runs that were stopped from outside (time limit, pre-emption): a run that
    # finished, or failed on its own, is not restarted, so a bug cannot loop. Slurm's own
    # requeue on node failure needs no help (#SBATCH --requeue). A job someone cancelled
    # stays cancelled.
    if [[ -n $POLAR_STOP ]]; then
        local state restarts=${SLURM_RESTART_COUNT:-0}
        state=$(polar_job_state || true)
        if [[ $state == CANCELLED ]]; then
            echo "${0##*/}: job was cancelled; not requeueing" >&2
        elif ((restarts >= ${MAX_REQUEUES:-100})); then
            echo "${0##*/}: already restarted $restarts times (MAX_REQUEUES); not requeueing" >&2
        else
            echo "${0##*/}: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))" >&2
            # The trainer resumes from the newest complete checkpoint in CKPT_DIR.
            scontrol requeue "$SLURM_JOB_ID" ||
                echo "${0##*/}: scontrol requeue failed (Slurm may be requeueing it already)" >&2
        fi
    fi
    exit "$rc"
}
