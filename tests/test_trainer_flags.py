"""Trainer flags and failure paths end to end (`python -m megatron_polar.train` subprocesses):
fine-tuning, resuming without optimizer/RNG state, separate validation data, SFT, skipped NaN
steps, SIGTERM, asynchronous saves and crashes during them, damaged checkpoints.

One reference run (`ref`, a checkpoint at every iteration) is what the others are compared to,
bit for bit where they should match it. Every run shares `COMMON`: the same data split and the
same LR schedule length.
"""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_polar.data.build import BuildConfig, build_triplets
from megatron_polar.runtime.checkpoints import LATEST
from megatron_polar.training.arguments import RESOLVED_CONFIG
from tests.test_build_triplets import good_records, write_jsonl
from tests.test_trainer import ENV, ROOT, base_args, losses, records, train

COMMON = ["--train-iters", "6", "--valid-fraction", "0.05"]


@pytest.fixture(scope="module")
def ref(data):
    """The uninterrupted run: 6 iterations from the initial weights, saved at every one."""
    root, tok, init = data
    ckpt = root / "ref" / "ckpt"
    train(root, "ref", *COMMON, "--pretrained-checkpoint", str(init), "--save", str(ckpt),
          "--save-interval", "1", data=data)
    return ckpt


def saved_state(directory: Path) -> dict:
    """Every tensor and value of a saved checkpoint, flattened: weights, Adam moments (per
    parameter, or the distributed optimizer's flat buffers), Adam's step and the optimizer's
    param groups. Not the RNG streams, nor the trainer's counters (iteration, scheduler,
    sampler). Read as raw torch.distributed.checkpoint items, whatever layout wrote them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state, flat = {}, {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(directory)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = value

    for key, value in state.items():
        if not key.startswith("rng_state"):
            walk(key, value)
    # What is not sharded (the plain optimizer's step and param groups) is in common.pt.
    common = torch.load(directory / "common.pt", weights_only=False)
    walk("common.pt:optimizer", common["optimizer"])
    return flat


def assert_identical(a: dict, b: dict, what: str) -> None:
    """Same keys; tensors equal bit for bit, other values equal."""
    assert a.keys() == b.keys(), what
    assert any("exp_avg_sq" in k for k in a) and any("decoder.layers" in k for k in a), what
    for k in a:
        if isinstance(a[k], torch.Tensor):
            x, y = a[k].contiguous().reshape(-1), b[k].contiguous().reshape(-1)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), \
                f"{what}: {k}"
        else:
            assert a[k] == b[k], f"{what}: {k}: {a[k]!r} != {b[k]!r}"


def it_dir(ckpt: Path, iteration: int) -> Path:
    return ckpt / f"iter_{iteration:07d}"


def test_sft_fine_tunes_a_pretrain_run_from_iteration_0_and_validates_on_other_data(data, ref):
    root, tok, init = data
    # `--load RUN --finetune`: RUN's latest weights, nothing else (iteration 0, fresh LR
    # schedule, optimizer and sampler). Here SFT starts from the pre-training run.
    sft = root / "sft" / "ckpt"
    out = train(root, "sft", *COMMON, "--stage", "sft", "--load", str(ref), "--finetune",
                "--save", str(sft), "--eval-interval", "6", "--eval-iters", "2", data=data)
    assert f"fine-tuning from the weights of {it_dir(ref, 6)}" in out
    logged, first = records(root, "sft"), records(root, "ref")
    assert [r["iteration"] for r in logged] == list(range(1, 7))
    assert [r["lr"] for r in logged] == [r["lr"] for r in first]  # the schedule starts afresh
    assert logged[0]["consumed_pairs"] == first[0]["consumed_pairs"] == 8
    assert all(r["loss"] is not None for r in logged) and len({r["loss"] for r in logged}) > 1
    # Same first batch as the reference run, other weights (ref's iteration 6, not the initial
    # ones: SFT without them would have refused to start).
    assert logged[0]["loss"] != first[0]["loss"]
    assert (sft / LATEST).read_text().strip() == "6"
    held_out = records(root, "sft", "valid")
    assert [(r["iteration"], r["pairs"]) for r in held_out] == [(6, 16)]

    # The SFT checkpoint resumes, and `--valid-data-path` evaluates on those datasets instead
    # of the held-out share: same weights, eval_iters x global batch pairs, other figures.
    build_triplets(BuildConfig([write_jsonl(root / "other.jsonl", good_records(40, seed=99))],
                               str(root / "other"), tok), progress=False)
    out = train(root, "sft_valid", "--stage", "sft", "--load", str(sft), "--skip-train",
                "--valid-data-path", str(root / "other"), "--eval-iters", "2", data=data)
    assert f"resumed from {it_dir(sft, 6)} (iteration 6," in out
    other = records(root, "sft_valid", "valid")
    assert [(r["iteration"], r["pairs"]) for r in other] == [(6, 16)]
    assert other[0]["loss"] != held_out[0]["loss"]
    assert other[0]["reward_chosen"] != held_out[0]["reward_chosen"]


def test_resume_without_optimizer_or_rng_state(data, ref):
    """`--load RUN` resumes at the saved iteration; `--no-load-optim` keeps the weights and
    the schedule but starts Adam afresh: the next loss is the reference run's (same weights,
    same batch), the one after is not (same weights' update from other moments, same LR).
    The model has no dropout, so RNG state changes no figure: the run says it was not restored."""
    root, tok, init = data
    out = train(root, "no_optim", *COMMON, "--load", str(ref), "--ckpt-step", "4",
                "--no-load-optim", "--no-load-rng", data=data)
    assert f"resumed from {it_dir(ref, 4)} (iteration 4," in out
    assert "optimizer state not loaded (--no-load-optim)" in out
    assert "RNG state not restored (--no-load-rng)" in out
    resumed, straight = losses(root, "no_optim"), losses(root, "ref")
    assert sorted(resumed) == [5, 6]
    assert resumed[5] == straight[5]
    assert resumed[6] != straight[6]
    lrs = {r["iteration"]: r["lr"] for r in records(root, "ref")}
    assert all(r["lr"] == lrs[r["iteration"]] for r in records(root, "no_optim"))


# DP=2 with the distributed optimizer, as the shipped configs run (the plain optimizer's skip
# goes through the same guarded step; tests/test_trainer.py counts skips in one process).
@pytest.mark.parametrize("dp", [2])
def test_nan_loss_and_nan_gradient_steps_leave_weights_and_adam_state_untouched(data, dp):
    """Iteration 3 has a NaN loss, iteration 4 a finite loss with NaN gradients: both are
    skipped, and the checkpoints of iterations 2, 3 and 4 hold the same tensors bit for bit
    (at DP=2 with the distributed optimizer, whose Adam state is sharded over the ranks)."""
    root, tok, init = data
    name = f"nan_dp{dp}"
    ckpt = root / name / "ckpt"
    extra = ["--use-distributed-optimizer"] if dp > 1 else []
    out = train(root, name, "--pretrained-checkpoint", str(init), "--train-iters", "4",
                "--valid-fraction", "0.05", "--save", str(ckpt), "--save-interval", "1",
                "--inject-nan-at", "3", "--inject-nan-grad-at", "4", *extra, data=data,
                nproc=dp)
    logged = records(root, name)
    assert [r["skipped_steps"] for r in logged] == [0, 0, 1, 2]
    assert logged[2]["loss"] is None and logged[2]["grad_norm"] is None
    assert logged[3]["grad_norm"] is None
    assert "iteration 3: non-finite loss or gradient norm (loss nan" in out
    # The loss of iteration 4 was finite; only its gradients were not.
    line = next(x for x in out.splitlines() if x.startswith("iteration 4: non-finite"))
    loss = float(line.split("(loss ")[1].split(",")[0])
    assert 0 < loss < 10 and "grad norm nan" in line
    before = saved_state(it_dir(ckpt, 2))
    assert_identical(before, saved_state(it_dir(ckpt, 3)), "NaN loss step")
    assert_identical(before, saved_state(it_dir(ckpt, 4)), "NaN gradient step")
    first = saved_state(it_dir(ckpt, 1))  # while a real step changes the tensors
    changed = [k for k in first if isinstance(first[k], torch.Tensor)
               and not torch.equal(first[k], before[k])]
    assert any(k.startswith("decoder.") for k in changed)
    assert any("exp_avg_sq" in k for k in changed)


def test_sigterm_then_a_crash_mid_async_save_then_resume_match_the_uninterrupted_run(data, ref):
    """SIGTERM after iteration 3 (the run waits for it there) saves iteration 3 and exits 0.
    The resumed run dies while publishing the asynchronous save of iteration 4: the marker
    stays at 3. Resumed again, it finishes: its losses and every checkpoint tensor (model and
    optimizer) equal the uninterrupted, synchronously saved run's, bit for bit. Along the way
    `--keep-last-checkpoints 2` prunes and TensorBoard gets its events."""
    root, tok, init = data
    ckpt, tb = root / "sigterm" / "ckpt", root / "sigterm" / "tb"
    flags = [*COMMON, "--pretrained-checkpoint", str(init), "--save", str(ckpt), "--load",
             str(ckpt), "--save-interval", "2", "--async-save", "--keep-last-checkpoints", "2",
             "--tensorboard-dir", str(tb)]
    (root / "sigterm").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_polar.train", *base_args(root, tok, "sigterm"), *flags,
         "--wait-for-signal-after-iteration", "3"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = root / "sigterm" / "log.jsonl"
    deadline = time.monotonic() + 300  # a hang guard only: the run waits for the signal
    while (proc.poll() is None and time.monotonic() < deadline
           and not (log.exists() and '"iteration": 3' in log.read_text())):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "SIGTERM received: checkpoint saved at iteration 3; exiting" in out
    assert (ckpt / LATEST).read_text().strip() == "3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000002", "iter_0000003", LATEST,
                                                      RESOLVED_CONFIG]
    for i in (2, 3):  # asynchronous saves, taken while training went on, equal synchronous ones
        assert_identical(saved_state(it_dir(ckpt, i)), saved_state(it_dir(ref, i)), f"iter {i}")

    out = train(root, "sigterm_crash", *flags, "--exit-during-save", "4", data=data,
                expect_rc=4)
    assert f"resumed from {it_dir(ckpt, 3)} (iteration 3," in out
    assert (ckpt / LATEST).read_text().strip() == "3"
    assert (ckpt / "iter_0000004.tmp").exists() and not it_dir(ckpt, 4).exists()

    out = train(root, "sigterm_resume", *flags, data=data)
    assert f"resumed from {it_dir(ckpt, 3)} (iteration 3," in out
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000004", "iter_0000006", LATEST,
                                                      RESOLVED_CONFIG]
    assert (ckpt / LATEST).read_text().strip() == "6"
    assert list(tb.glob("events.out.tfevents.*"))
    straight = losses(root, "ref")
    assert losses(root, "sigterm") == {i: straight[i] for i in (1, 2, 3)}
    assert losses(root, "sigterm_crash")[4] == straight[4]
    assert losses(root, "sigterm_resume") == {i: straight[i] for i in (4, 5, 6)}
    for i in (4, 6):
        assert_identical(saved_state(it_dir(ckpt, i)), saved_state(it_dir(ref, i)), f"iter {i}")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error")]


def test_damaged_checkpoints_stop_with_one_line_naming_them(data, ref, tmp_path, monkeypatch,
                                                             capsys):
    root, tok, init = data
    from megatron_polar.training import trainer

    # Found before any work (in this process: the trainer must not get as far as setting up).
    def no_setup(*a, **k):
        raise AssertionError("the trainer got past the checkpoint checks")

    monkeypatch.setattr(trainer, "initialize_parallel", no_setup)
    garbage, missing = tmp_path / "garbage", tmp_path / "missing"
    garbage.mkdir()
    (garbage / LATEST).write_text("abc\n")
    missing.mkdir()
    (missing / LATEST).write_text("5\n")
    cases = [
        (["--load", str(garbage)], f"{garbage / LATEST}: expected an iteration number, "
                                   "found 'abc'"),
        (["--load", str(missing)], f"{missing / LATEST} names iteration 5, but "
                                   f"{it_dir(missing, 5)} is not a complete checkpoint"),
        (["--load", str(ref), "--model-preset", "small"],
         f"--model-preset small does not match the preset recorded in {ref} (tiny); leave "
         "--model-preset out to use it"),
    ]
    for extra, message in cases:
        assert trainer.main([*base_args(root, tok, "damaged"), *COMMON, *extra]) == 1
        captured = capsys.readouterr()
        assert _error_lines(captured.err) == [f"error: {message}"], captured.err
        assert "Traceback" not in captured.err and captured.out == ""

    # Found by megatron/torch while loading (subprocesses, side by side): a shard cut in half,
    # and a checkpoint without model.json loaded into a model of another shape.
    truncated, reshaped = tmp_path / "truncated", tmp_path / "reshaped"
    for run in (truncated, reshaped):
        shutil.copytree(it_dir(ref, 6), it_dir(run, 6))
        (run / LATEST).write_text("6\n")
    shard = sorted(it_dir(truncated, 6).glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    (it_dir(reshaped, 6) / "model.json").unlink()
    narrow = tmp_path / "narrow.json"
    narrow.write_text((it_dir(ref, 6) / "model.json").read_text()
                      .replace('"hidden_size": 64', '"hidden_size": 32'))
    runs = [(["--load", str(truncated)], f"error: {it_dir(truncated, 6)}: cannot be read ("),
            (["--load", str(reshaped), "--model-preset", str(narrow)],
             f"error: {it_dir(reshaped, 6)}: cannot be read (CheckpointingException: ")]
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_polar.train",
                               *base_args(root, tok, f"damaged{i}"), *COMMON, *extra],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, (extra, _) in enumerate(runs)]
    for proc, (_, message) in zip(procs, runs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, out[-2000:] + err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert [line[:len(message)] for line in _error_lines(err)] == [message], err[-3000:]
