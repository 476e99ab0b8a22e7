"""`python -m megatron_polar.train` end to end, as users launch it (subprocesses, torchrun)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_polar.runtime.checkpoints import LATEST
from megatron_polar.testing.tokenizers import make_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"


def base_args(root, tok, name):
    return ["--model-preset", "tiny", "--data-path", str(root / "pairs"), "--tokenizer", tok,
            "--micro-batch-tokens", "768", "--global-batch-size", "8", "--lr", "2e-3",
            "--log-interval", "1", "--log-json", str(root / name / "log.jsonl"), "--seed", "7"]


def train(root, name, *extra, data, nproc=1, expect_rc=0, timeout=300):
    (root / name).mkdir(parents=True, exist_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc), "-m", "megatron_polar.train"] if nproc > 1
                else [sys.executable, "-m", "megatron_polar.train"])
    proc = subprocess.run(launcher + base_args(data[0], data[1], name) + list(extra), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect_rc, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout if expect_rc == 0 else proc.stdout + proc.stderr


def records(root, name, kind="train"):
    path = root / name / "log.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def losses(root, name):
    return {r["iteration"]: r["loss"] for r in records(root, name)}


def weights(ckpt_dir: Path) -> dict:
    """Every model tensor of a saved checkpoint, read without building a model."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    iteration = int((ckpt_dir / LATEST).read_text())
    state = load_plain_tensors(str(ckpt_dir / f"iter_{iteration:07d}"))
    return {k: v for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def test_nan_steps_are_skipped_counted_and_persistent_nans_stop_the_run(data):
    root, tok, init = data
    common = ["--pretrained-checkpoint", str(init), "--train-iters", "5"]
    out = train(root, "one_nan", *common, "--inject-nan-at", "3", data=data)
    assert "iteration 3: non-finite loss" in out
    logged = records(root, "one_nan")
    assert [r["skipped_steps"] for r in logged] == [0, 0, 1, 1, 1]
    assert logged[2]["loss"] is None and all(r["loss"] is not None for r in logged[3:])
    out = train(root, "many_nans", *common, "--inject-nan-at", "2", "3", "4",
                "--max-consecutive-skipped-steps", "3", data=data, expect_rc=1)
    assert "stopping at iteration 4: 3 steps in a row (iterations 2-4)" in out


def test_yaml_config_with_flag_overrides_and_clear_errors(data, tmp_path):
    from megatron_polar.config.flags import ConfigError
    from megatron_polar.training.arguments import parse_train_args

    root, tok, _ = data
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model-preset: tiny\nglobal_batch_size: 16\nlr: 1.0e-3\ntrain-iters: 3\n"
                   f"micro-batch-tokens: 512\ndata-path: {root / 'pairs'}\n")
    args = parse_train_args(["--config", str(cfg), "--lr", "5e-4"])
    assert (args.global_batch_size, args.lr, args.train_iters) == (16, 5e-4, 3)
    assert args.data_path == [str(root / "pairs")] and args.min_lr is None
    cfg.write_text("learning-rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown key 'learning-rate'"):  # typed, not an exit
        parse_train_args(["--config", str(cfg)])


def test_sft_needs_initial_weights_and_a_wrong_tokenizer_is_refused(data, tmp_path):
    root, tok, init = data
    out = train(root, "sft_bare", "--stage", "sft", "--train-iters", "1", data=data, expect_rc=1)
    assert "SFT starts from a pre-trained POLAR model" in out
    other_tok = make_sentencepiece(tmp_path, vocab_size=300)
    out = train(root, "wrong_tok", "--train-iters", "1", "--tokenizer", str(other_tok),
                data=data, expect_rc=1)
    assert "not this run's" in out


def test_fp8_without_te_on_hopper_is_a_clear_error_before_any_work(data):
    root, tok, _ = data
    out = train(root, "fp8", "--train-iters", "1", "--fp8-format", "hybrid", data=data,
                expect_rc=1)
    assert "FP8 (hybrid) needs Transformer Engine" in out


def test_shared_prefix_training_matches_plain_packing_for_20_steps(data):
    """The default shared-prefix packing (each pair's prompt and reference computed once)
    trains exactly as whole-sequence packing: the same losses step by step, fewer tokens.
    (A large Adam eps keeps updates linear in the gradients: with 1e-8, Adam's near-sign
    updates of tiny gradients turn float rounding, which differs between the layouts'
    attention shapes, into 1e-3 loss differences after a few steps.)"""
    root, tok, init = data
    common = ["--pretrained-checkpoint", str(init), "--train-iters", "20", "--log-interval", "1",
              "--adam-eps", "1e-4"]
    train(root, "shared_on", *common, data=data)
    train(root, "shared_off", *common, "--no-shared-prefix", data=data)
    on, off = records(root, "shared_on"), records(root, "shared_off")
    assert [r["iteration"] for r in on] == list(range(1, 21))
    for a, b in zip(on, off):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["iteration"]
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-6)
        assert a["consumed_tokens"] == b["consumed_tokens"]  # the same pairs, counted in full
    assert all(r["prefix_saving"] > 0.2 for r in on) and all(r["prefix_saving"] == 0 for r in off)
    assert all(r["pairs_per_s"] > 0 for r in on)


def test_ranked_list_dataset_trains_one_item_per_list(data):
    """A --list-documents dataset: each step takes whole lists (every ordered pair of a list
    counts towards the global batch), computes each list's prompt and reference once; whole-
    sequence packing of lists is refused by name."""
    from megatron_polar.data.build import BuildConfig, build_triplets
    from tests.test_build_rankings import ranked_records, write_jsonl

    root, tok, init = data
    src = write_jsonl(root / "ranked.jsonl", ranked_records(60, n_responses=5, seed=9))
    build_triplets(BuildConfig([src], str(root / "lists"), tok, from_rankings=True,
                               list_documents=True), progress=False)
    lists = ["--data-path", str(root / "lists"), "--pretrained-checkpoint", str(init),
             "--train-iters", "3", "--stage", "sft"]
    train(root, "lists", *lists, data=data)
    logged = records(root, "lists")
    steps = [b["consumed_pairs"] - a["consumed_pairs"]
             for a, b in zip([{"consumed_pairs": 0}] + logged, logged)]
    assert all(8 <= n < 8 + 6 for n in steps), steps  # lists of 6 pairs, whole
    assert all(r["prefix_saving"] > 0.4 for r in logged)
    out = train(root, "lists_plain", *lists, "--no-shared-prefix", data=data, expect_rc=1)
    assert "ranked-list datasets (built with --list-documents) train with shared-prefix" in out
