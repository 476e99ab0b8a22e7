"""Serve a POLAR reward model to NeMo-Aligner PPO (PyTriton) and to POLAR's client (/pooling).

    python -m megatron_polar.serving --hf POLAR-7B-mine --references refs.jsonl \\
        --actor-tokenizer ACTOR_TOKENIZER --port 5555
    python -m megatron_polar.serving --checkpoint runs/polar7b --references refs.jsonl \\
        --critic --critic-save runs/critic --port 5567          # combined RM + critic server
    torchrun --nproc-per-node 2 -m megatron_polar.serving --checkpoint runs/polar7b \\
        --tensor-model-parallel-size 2 --references refs.jsonl --critic ...   # rank 0 serves

Binds to 127.0.0.1 unless --host says otherwise. See docs/rlhf.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    from megatron_polar.config.flags import add_flags
    from megatron_polar.eval.flags import add_scorer_args
    from megatron_polar.serving.critic import CriticConfig
    from megatron_polar.serving.postprocess import PostprocessConfig
    from megatron_polar.serving.rewards import RequestLimits
    from megatron_polar.serving.triton_models import TritonSettings

    p = argparse.ArgumentParser(prog="python -m megatron_polar.serving",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None,
                   help="YAML file of flag values (flag names without dashes); flags given on "
                        "the command line win (examples/rlhf/nemo_aligner/)")
    # the model: exactly one of --checkpoint and --hf, checked after a --config file is read
    add_scorer_args(p, required=False)

    g = p.add_argument_group("prompts and references (token requests)")
    g.add_argument("--references", default=None,
                   help="reference file (tools/make_rlhf_prompts.py); without it only /pooling "
                        "serves")
    g.add_argument("--actor-tokenizer", default=None,
                   help="the PPO actor's tokenizer (.model file or HF tokenizer dir; default: "
                        "the reward model's)")
    g.add_argument("--actor-eos-ids", default=None,
                   help="comma-separated ids cut from the end of a response (default: the "
                        "actor tokenizer's EOS)")
    g.add_argument("--unknown-prompt-reward", type=float, default=None,
                   help="reward of a sequence whose prompt is not in the reference file "
                        "(default: refuse the request, naming the batch index)")

    # Flags generated from the fields of the components they configure.
    add_flags(p.add_argument_group("reward post-processing (default: raw rewards, as "
                                   "released)"), PostprocessConfig, prefix="reward_")
    g = p.add_argument_group("servers")
    add_flags(g, TritonSettings)
    g.add_argument("--pooling-port", type=int, default=23333,
                   help="HTTP port of /pooling (POLAR's client); 0 turns it off")
    add_flags(g, RequestLimits)
    g = p.add_argument_group("critic (NeMo-Aligner combine_rm_and_critic_server=True)")
    g.add_argument("--critic", action="store_true",
                   help="also serve critic_infer / critic_train / critic_save")
    add_flags(g, CriticConfig, prefix="critic_")
    g.add_argument("--critic-load", default=None, help="resume the critic from a checkpoint")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_polar.training.arguments import yaml_defaults

    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**yaml_defaults(first.config, parser))
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.hf is None):
        parser.error("give the model: exactly one of --checkpoint or --hf")
    return args


def main(argv=None) -> int:
    from megatron_polar.config.flags import ConfigError
    from megatron_polar.serving.server import ServerError, build_server

    try:
        args = parse_args(argv)
    except ConfigError as e:  # a bad --config file
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        server = build_server(args)
    except (ServerError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not server.is_front:
        # Followers leave when rank 0 tells them (after its own SIGTERM), so that a model
        # operation in flight is never cut on some ranks only.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        server.follow()
        _leave_process_group()
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with server:
        print(json.dumps({"ready": server.describe()}), flush=True)
        stop.wait()
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """All ranks leave together and tear their groups down before the interpreter exits: a
    follower that exited with gloo's threads still alive died in `std::terminate` (exit -6)
    now and then, failing torchrun's exit status."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
