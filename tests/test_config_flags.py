"""Flags generated from typed config fields (config/flags.py): every CLI accepts exactly the
flags it accepted before the generator (tests/data/cli_flags_before_issue16.json, dumped from
the hand-written parsers of commit 48991a9), every shipped YAML and Slurm command line resolves
to the values the hand-written code gave, and derived values are resolved once and written
where `--config` reads them back."""

import argparse
import importlib.util
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from megatron_polar.config.flags import ConfigError, add_flags, from_namespace, option
from megatron_polar.model.config import FP8Config, ModelRunConfig
from megatron_polar.model.presets import get_preset
from megatron_polar.training.arguments import (RESOLVED_CONFIG, parse_train_args,
                                               resolve_train_args, run_config_from_args,
                                               write_resolved_config)
from tests.test_slurm_scripts import LAUNCHERS, dry_run, parse_dry_run

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests/data/cli_flags_before_issue16.json").read_text())


def flag_table(parser: argparse.ArgumentParser) -> dict:
    """What a flag accepts: the same fields the recorded table holds."""
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        for opt in a.option_strings:
            out[opt] = {"dest": a.dest, "default": a.default,
                        "type": getattr(a.type, "__name__", None),
                        "choices": list(a.choices) if a.choices is not None else None,
                        "nargs": a.nargs, "action": type(a).__name__, "required": a.required}
    return out


def parsers() -> dict:
    from megatron_polar.score import build_parser as score_parser
    from megatron_polar.serving.__main__ import build_parser as serving_parser
    from megatron_polar.training.arguments import build_train_parser

    spec = importlib.util.spec_from_file_location("eval_preference_tool",
                                                  ROOT / "tools/eval_preference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return {"train": build_train_parser(), "score": score_parser(),
            "serving": serving_parser(), "eval_preference": tool.build_parser()}


# Flags added since the table was recorded, on purpose: --exit-duration-in-mins (issue 16),
# --shared-prefix and its --no- form (issue 17).
ADDED = {"train": {"--exit-duration-in-mins", "--shared-prefix", "--no-shared-prefix"}}


def test_every_cli_accepts_exactly_the_flags_it_did():
    now = {name: flag_table(p) for name, p in parsers().items()}
    assert sorted(now) == sorted(BEFORE)
    for name in BEFORE:
        assert sorted(now[name]) == sorted(set(BEFORE[name]) | ADDED.get(name, set())), name
        for opt, before in BEFORE[name].items():
            assert now[name][opt] == before, (name, opt)


def run_config_as_before(args, num_layers: int) -> ModelRunConfig:
    """The hand-written mapping of flags to ModelRunConfig the generator replaced."""
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage = num_layers // args.pipeline_model_parallel_size
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    return ModelRunConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel, tp_comm_overlap=args.tp_comm_overlap,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        bf16=args.bf16,
        fp8=FP8Config(format=args.fp8_format, recipe=args.fp8_recipe, margin=args.fp8_margin,
                      amax_history_len=args.fp8_amax_history_len,
                      amax_compute_algo=args.fp8_amax_compute_algo),
        use_transformer_engine={"auto": None, "transformer_engine": True,
                                "local": False}[args.transformer_impl],
        seed=args.seed)


def launcher_argv(name: str) -> list[str]:
    _, per_node = parse_dry_run(dry_run(name).stdout)
    argv = shlex.split(per_node[0].split(":", 1)[1])
    return argv[argv.index("megatron_polar.train") + 1:]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_shipped_configs_and_launchers_resolve_as_before(name):
    """The Slurm command line (with its shipped YAML), and variants that exercise the model
    group's derived and mapped values, give the ModelRunConfig the hand-written code gave."""
    argv = launcher_argv(name)
    args = parse_train_args(argv)
    preset = get_preset(args.model_preset)
    assert run_config_from_args(args, preset.num_layers) == \
        run_config_as_before(args, preset.num_layers)
    for extra in (["--transformer-impl", "local", "--fp8-format", "hybrid", "--fp8-margin", "1"],
                  ["--pipeline-model-parallel-size", "2",
                   "--num-layers-per-virtual-pipeline-stage", "2", "--recompute-granularity",
                   "full", "--recompute-method", "block", "--recompute-num-layers", "1"]):
        varied = parse_train_args(argv + extra)
        new = run_config_from_args(varied, preset.num_layers)
        assert new == run_config_as_before(varied, preset.num_layers)
    assert new.virtual_pipeline_model_parallel_size == preset.num_layers // 2 // 2


def test_the_serving_config_shipped_for_nemo_aligner_parses():
    from megatron_polar.serving.__main__ import parse_args

    cfg = ROOT / "examples/rlhf/nemo_aligner/polar_critic_server.yaml"
    args = parse_args(["--config", str(cfg), "--checkpoint", "ckpt"])
    run = run_config_from_args(args, get_preset(args.model_preset or "tiny").num_layers)
    assert run == run_config_as_before(args, get_preset(args.model_preset or "tiny").num_layers)


def test_bad_values_are_config_errors_naming_the_flag(tmp_path):
    args = parse_train_args(["--data-path", "x", "--micro-batch-tokens", "64", "--lr", "1e-3",
                             "--global-batch-size", "8", "--train-iters", "1",
                             "--pipeline-model-parallel-size", "2",
                             "--num-layers-per-virtual-pipeline-stage", "3"])
    with pytest.raises(ConfigError, match="--num-layers-per-virtual-pipeline-stage must divide"):
        run_config_from_args(args, 8)
    args = parse_train_args(["--data-path", "x", "--micro-batch-tokens", "64", "--lr", "1e-3",
                             "--global-batch-size", "8", "--train-iters", "1",
                             "--tp-comm-overlap"])
    with pytest.raises(ConfigError, match="--tp-comm-overlap needs --sequence-parallel"):
        run_config_from_args(args, 8)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=f"--config {bad}: expected a mapping"):
        parse_train_args(["--config", str(bad)])


def test_derived_values_are_resolved_once_and_read_back(tmp_path):
    argv = ["--data-path", "x", "--micro-batch-tokens", "1024", "--train-iters", "5",
            "--auto-hparams", "--base-tokens", "2.5e12", "--rm-tokens", "0.94e12",
            "--model-preset", "tiny", "--inject-nan-at", "2", "3"]
    args = parse_train_args(argv)
    resolved, notes = resolve_train_args(args, get_preset("tiny"))
    assert args.lr is None and args.min_lr is None  # the parsed flags are left as given
    assert resolved.lr > 0 and resolved.min_lr == pytest.approx(0.1 * resolved.lr)
    assert resolved.global_batch_size > 0 and "batch counted in triplets" in notes[0]
    path = write_resolved_config(resolved, str(tmp_path / "run"))
    assert path == tmp_path / "run" / RESOLVED_CONFIG and not list(path.parent.glob("*.tmp*"))
    again = parse_train_args(["--config", str(path)])
    assert vars(again) == {**vars(resolved), "config": str(path)}
    assert resolve_train_args(again, get_preset("tiny"))[0] == \
        argparse.Namespace(**{**vars(resolved), "config": str(path)})


@dataclass
class _Inner:
    depth: int = option(3, help="inner")
    mode: str = option("a", choices=("a", "b"))


@dataclass
class _Outer:
    name: Optional[str] = option(None)
    flag_on: bool = option(False)
    inner: _Inner = option(default_factory=_Inner)
    switch: Optional[bool] = option(None, flag="--which", choices={"auto": None, "yes": True,
                                                                   "no": False})
    hidden: float = option(0.5, cli=False)

    def __post_init__(self):
        if self.inner.depth < 0:
            raise ValueError("--inner-depth must be >= 0")


def test_the_generator_nests_maps_and_checks():
    p = argparse.ArgumentParser()
    add_flags(p, _Outer)
    assert sorted(flag_table(p)) == ["--flag-on", "--inner-depth", "--inner-mode", "--name",
                                     "--which"]
    ns = p.parse_args(["--inner-depth", "5", "--which", "no", "--flag-on"])
    assert from_namespace(_Outer, ns) == _Outer(None, True, _Inner(5, "a"), False, 0.5)
    assert from_namespace(_Outer, p.parse_args([])).switch is None
    with pytest.raises(ConfigError, match="--inner-depth must be >= 0"):
        from_namespace(_Outer, p.parse_args(["--inner-depth", "-1"]))
    with pytest.raises(SystemExit):  # argparse's own refusal of a value outside the choices
        p.parse_args(["--inner-mode", "c"])


def test_the_trainer_config_is_typed_per_component_and_checked(tmp_path):
    from megatron_polar.training.arguments import train_config

    argv = ["--data-path", "x", "--micro-batch-tokens", "512", "--lr", "1e-3",
            "--global-batch-size", "8", "--train-iters", "4", "--save", str(tmp_path),
            "--inject-nan-at", "2", "--eval-iters", "3", "--stage", "sft"]
    args = parse_train_args(argv)
    run = run_config_from_args(args, 4)
    cfg = train_config(resolve_train_args(args, get_preset("tiny"))[0], run)
    assert (cfg.stage, cfg.run, cfg.data.data_path, cfg.data.micro_batch_tokens) == \
        ("sft", run, ["x"], 512)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.train_iters) == (1e-3, 1e-4, 4)
    assert cfg.checkpoint.save == str(tmp_path) and cfg.faults.inject_nan_at == [2]
    assert cfg.logging.eval_iters == 3
    settings = cfg.optim.settings(100)
    assert (settings.lr, settings.min_lr, settings.warmup_steps) == (1e-3, 1e-4, 3)
    for flag, value, match in (("--valid-fraction", "1.5", "--valid-fraction must lie"),
                               ("--log-interval", "0", "--log-interval must be >= 1"),
                               ("--lr-warmup-fraction", "1", "--lr-warmup-fraction must lie")):
        bad = parse_train_args(argv + [flag, value])
        with pytest.raises(ConfigError, match=match):
            train_config(resolve_train_args(bad, get_preset("tiny"))[0], run)


def test_the_trainer_cli_stops_on_a_bad_config_with_status_2(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning-rate: 1.0\n")
    proc = subprocess.run([sys.executable, "-m", "megatron_polar.train", "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"error: --config {cfg}: unknown key 'learning-rate'" in proc.stderr


def test_a_missing_logging_package_stops_every_rank_before_any_work(tmp_path):
    """wandb is not installed here: the check runs on every rank, before process groups."""
    import subprocess
    import sys

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    argv = ["--data-path", str(tmp_path / "none"), "--micro-batch-tokens", "64", "--lr", "1e-3",
            "--global-batch-size", "2", "--train-iters", "1", "--wandb-project", "p"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "megatron_polar.train", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --wandb-project needs the wandb package") == 2
