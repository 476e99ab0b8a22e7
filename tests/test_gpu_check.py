"""`make gpu-check` (tools/gpu_check.py) on a CPU with --allow-cpu, and the MFU peak table.

The GPU items (TE parity, FP8, peak memory) can only be skipped here; the tests check that they
say why, that the CPU items pass, that a wrong value makes an item (and the exit status) fail,
and, on two gloo ranks, that the checkpoint item sees the parameter all-gather that
overlap_param_gather defers and fails when nothing forces it before the save.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_polar.training import flops
from megatron_polar.training.gpu_check import ITEMS, NO_GPU_MESSAGE, exit_code, merge_ranks
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
# As a user runs it, and on the CPU even on a machine with a GPU.
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
       "CUDA_VISIBLE_DEVICES": ""}


def gpu_check(*args, timeout=300):
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# -- MFU peak table ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H800", 989.0),
    ("NVIDIA H800 80GB HBM3", 989.0),
    ("NVIDIA H800 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H200 141GB HBM3e", 989.0),
    ("NVIDIA H20", 148.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A800-SXM4-80GB", 312.0),
    ("NVIDIA A800 80GB PCIe", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA B200", 2250.0),
    # Not in the table: no MFU rather than a wrong one.
    ("NVIDIA H100 NVL", None),  # not the SXM figure
    ("NVIDIA H200 NVL", None),
    ("NVIDIA L40", None),  # "L40S" must not match it
    ("NVIDIA A10", None),  # nor "A100"
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_tflops_from_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(flops, "on_gpu", lambda: True)  # as if the run had chosen a GPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    assert flops.peak_tflops_of_this_gpu() == peak
    assert flops.peak_tflops_for_device_name(name) == peak


def test_most_specific_key_wins_and_h20_is_not_h200():
    assert flops.peak_tflops_for_device_name("nvidia h100 pcie") == 756.0  # case-insensitive
    assert flops.peak_tflops_for_device_name("NVIDIA H200") != flops.PEAK_BF16_TFLOPS["H20"]
    assert flops.peak_tflops_for_device_name("NVIDIA H20") == 148.0


def test_no_peak_without_cuda(monkeypatch):
    monkeypatch.setattr(flops, "on_gpu", lambda: False)
    assert flops.peak_tflops_of_this_gpu() is None


# -- the tool on a CPU -------------------------------------------------------------------------

def test_refuses_without_a_gpu():
    proc = gpu_check()
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == NO_GPU_MESSAGE


def test_cpu_run_reports_every_item(tmp_path):
    report_path = tmp_path / "report.json"
    proc = gpu_check("--allow-cpu", "--model-preset", "tiny", "--report", str(report_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    for key in ("environment", "world_size", "items", "summary", "tolerances", "ok"):
        assert key in report
    env = report["environment"]
    for key in ("device", "capability", "torch", "transformer_engine", "megatron_core"):
        assert key in env
    assert env["megatron_core"] and env["torch"] == torch.__version__
    assert report["world_size"] == 1 and report["ok"] is True
    items = {item["name"]: item for item in report["items"]}
    assert [item["name"] for item in report["items"]] == list(ITEMS)
    for item in report["items"]:
        assert item["status"] in ("pass", "skip")
        for key in ("title", "reason", "figures", "seconds", "peak_memory_gib"):
            assert key in item
        if item["status"] == "skip":
            assert item["reason"] and len(item["reason"]) > 10, item
    # What cannot run on a CPU says so; what can, passes.
    for name in ("te_parity", "fp8_step", "tp_comm_overlap", "peak_memory"):
        assert items[name]["status"] == "skip"
    assert "CUDA" in items["te_parity"]["reason"]
    assert items["tp_comm_overlap"]["reason"].startswith(
        "needs TE, CUDA and torchrun with >= 2 GPUs")
    assert "--tensor-model-parallel-size 2" in items["tp_comm_overlap"]["reason"]
    assert report["tensor_model_parallel_size"] == 1
    for name in ("packed_vs_unpacked", "flex_attention", "shared_prefix",
                 "checkpoint_after_overlap", "throughput"):
        assert items[name]["status"] == "pass", items[name]
    packed = items["packed_vs_unpacked"]["figures"]
    assert packed["local.fp32.packed_vs_alone_packed"]["rel_err"] <= 1e-4
    assert packed["local.bf16.packed_vs_alone_padded"]["tol"] == pytest.approx(2e-2)
    assert items["flex_attention"]["figures"]["fp32.out"]["flex_rel_err"] < 1e-5
    shared = items["shared_prefix"]["figures"]
    assert shared["tokens"]["shared"] < 0.75 * shared["tokens"]["plain"]  # prefixes once
    assert shared["local.fp32.rewards"]["rel_err"] <= 1e-4
    assert shared["local.fp32.grads"]["rel_err"] <= 1e-4 and shared["local.fp32.grads"]["tensors"]
    bf16 = shared["local.bf16.grads"]
    assert bf16["shared_rel_err_vs_fp32"] <= bf16["bound"]
    assert "te" in shared["variants_skipped"]
    assert "tokens" in items["shared_prefix"]["headline"]
    ckpt = items["checkpoint_after_overlap"]["figures"]
    assert ckpt["main_param_elements_checked"] > 0 and ckpt["main_param_mismatches"] == 0
    assert ckpt["tensors_differing_from_checkpoint"] == 0
    speed = items["throughput"]["figures"]
    assert speed["tokens_per_s"] > 0 and speed["tflops_per_gpu"] > 0
    assert speed["mfu"] is None  # a CPU has no peak in the table
    assert report["summary"] == {"passed": 5, "failed": 0, "skipped": 4}
    assert "te_parity" in proc.stdout and "5 passed, 0 failed, 4 skipped" in proc.stdout


def test_a_wrong_value_fails_the_item_and_the_exit_status(tmp_path):
    report_path = tmp_path / "report.json"
    proc = gpu_check("--allow-cpu", "--model-preset", "tiny", "--checks",
                     "flex_attention,te_parity", "--inject-fault", "flex_attention",
                     "--report", str(report_path))
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    items = {item["name"]: item for item in report["items"]}
    assert set(items) == {"flex_attention", "te_parity"}
    assert items["flex_attention"]["status"] == "fail"
    assert "flex error" in items["flex_attention"]["reason"]
    assert items["te_parity"]["status"] == "skip" and report["ok"] is False
    assert exit_code(report) == 1


def test_tensor_parallel_flag_is_accepted_and_checked(tmp_path):
    report_path = tmp_path / "report.json"
    proc = gpu_check("--allow-cpu", "--model-preset", "tiny", "--tensor-model-parallel-size", "1",
                     "--checks", "tp_comm_overlap", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (item,) = json.loads(report_path.read_text())["items"]
    assert item["name"] == "tp_comm_overlap" and item["status"] == "skip"
    assert "TP=1" in item["reason"]
    # One process cannot hold TP=2: refused before anything starts.
    proc = gpu_check("--allow-cpu", "--tensor-model-parallel-size", "2")
    assert proc.returncode == 2 and "divide the world size 1" in proc.stderr


def _items_at_tp2(out_dir):
    from megatron_polar.training.gpu_check import main

    assert main(["--allow-cpu", "--model-preset", "tiny", "--tensor-model-parallel-size", "2",
                 "--checks", "packed_vs_unpacked,tp_comm_overlap",
                 "--report", str(Path(out_dir) / "tp2.json")]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo/CPU test; on a GPU run torchrun")
def test_at_tp2_the_tp1_items_skip_and_tp_comm_overlap_says_what_it_lacks(tmp_path):
    run_distributed(2, _items_at_tp2, str(tmp_path))
    report = json.loads((tmp_path / "tp2.json").read_text())
    assert report["tensor_model_parallel_size"] == 2 and report["data_parallel_size"] == 1
    items = {item["name"]: item for item in report["items"]}
    assert items["packed_vs_unpacked"]["status"] == "skip"
    assert "runs at TP=1" in items["packed_vs_unpacked"]["reason"]
    overlap = items["tp_comm_overlap"]
    assert overlap["status"] == "skip" and "CUDA" in overlap["reason"]
    assert "TP >= 2" not in overlap["reason"]  # the layout is there; the GPU and TE are not


def test_unknown_check_is_refused():
    proc = gpu_check("--allow-cpu", "--checks", "nope")
    assert proc.returncode == 2 and "unknown check" in proc.stderr


def test_ranks_merge_to_the_worst():
    ok = {"name": "throughput", "status": "pass", "reason": None, "peak_memory_gib": 1.0,
          "peak_reserved_gib": 2.0, "failed_ranks": []}
    bad = {**ok, "status": "fail", "reason": "boom", "peak_memory_gib": 3.0}
    merged = merge_ranks([ok, bad, ok])
    assert merged["status"] == "fail" and merged["failed_ranks"] == [1]
    assert merged["reason"] == "rank 1: boom" and merged["peak_memory_gib"] == 3.0
    assert merge_ranks([ok, ok])["status"] == "pass"


# -- helpers of the GPU-only items, on the CPU -------------------------------------------------

def test_weights_map_by_checkpoint_key_and_gradients_compare(ctx1):
    from megatron_polar.data.packing import build_packed_micro_batch
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.training.gpu_check import (Findings, compare_gradients, copy_weights,
                                                   keyed_tensors, loss_gradients)
    from megatron_polar.runtime.chunks import build_model_chunks
    from megatron_polar.runtime.schedules import score_packed
    from tests.test_parallel_parity_tiny import fixed_pairs

    preset = get_preset("tiny")
    a = build_model_chunks(preset, ModelRunConfig(), ctx1)
    b = build_model_chunks(preset, ModelRunConfig(), ctx1)
    keys = keyed_tensors(a)
    # The local spec's norms under TE's fused names: what lets TE-spec models take the weights.
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.weight" in keys  # SwiGLU's factory, unwrapped
    assert all(isinstance(t, torch.nn.Parameter) for t in keys.values())
    pack = build_packed_micro_batch(fixed_pairs(3), 256, preset.pad_token_id)
    assert not torch.equal(score_packed(a, [pack], ctx1), score_packed(b, [pack], ctx1))
    assert copy_weights(a, b) == len(keys)
    assert torch.equal(score_packed(a, [pack], ctx1), score_packed(b, [pack], ctx1))
    grads_a, grads_b = loss_gradients(a, pack), loss_gradients(b, pack)
    assert set(grads_a) == set(keys) and all(g.abs().sum() > 0 for g in grads_a.values())
    f = Findings()
    compare_gradients(f, "same", grads_b, grads_a, 1e-6)
    assert not f.failures and f.figures["same"]["rel_err"] == 0.0
    grads_b["decoder.final_layernorm.weight"] = grads_b["decoder.final_layernorm.weight"] * 2
    compare_gradients(f, "one_tensor_off", grads_b, grads_a, 1e-2)
    assert any("decoder.final_layernorm.weight" in m for m in f.failures)
    with pytest.raises(RuntimeError, match="do not map"):
        copy_weights(a, build_model_chunks(get_preset("tiny-2l"), ModelRunConfig(), ctx1))


def test_gpu_only_items_run_their_comparisons(ctx1, tmp_path, monkeypatch):
    """te_parity and fp8_step with both models built from the local spec in bf16/fp32 (what
    a CPU can build): the code of the items runs, and identical models pass with zero error."""
    from megatron_polar.model.presets import get_preset
    from megatron_polar.training import gpu_check as gc

    real_build = gc.build

    def local_build(env, preset, *, bf16, use_te, fp8=None, ddp=None):
        return real_build(env, preset, bf16=bf16, use_te=False, ddp=ddp)

    monkeypatch.setattr(gc.models, "build", local_build)  # the items call models.build
    preset = get_preset("tiny")
    args = gc.build_parser().parse_args(["--fp8-steps", "2"])
    env = gc.CheckEnv(args=args, ctx=ctx1, preset=preset, check_preset=preset, on_gpu=True,
                      te=True, capability=(9, 0), tf32=False, rank=0, world=1,
                      workdir=tmp_path, long_sequences=False)
    f = gc.Findings()
    gc.check_te_parity(env, f)
    assert not f.failures, f.failures
    for name in ("fp32.rewards_padded", "bf16.rewards_padded", "bf16.rewards_packed"):
        assert f.figures[name]["rel_err"] == 0.0
    for name in ("fp32.grads_padded", "bf16.grads_padded", "bf16.grads_packed"):
        assert f.figures[name]["rel_err"] == 0.0 and f.figures[name]["tensors"] > 20
    f = gc.Findings()
    gc.check_fp8_step(env, f)
    assert not f.failures, f.failures
    assert f.figures["loss_bf16"] == f.figures["loss_fp8"]
    assert len(set(f.figures["loss_bf16"])) == 1  # lr 0: every step sees the same model
    assert f.figures["rewards_after_steps"]["rel_err"] == 0.0


def _check_env(gc, ctx, tmp_path, *argv, on_gpu=False, te=False):
    """A CheckEnv on this CPU of the small tiny-2l preset (CPU-sized sequences); `on_gpu`/`te`
    only make the items take their GPU branches (the models still run here)."""
    from megatron_polar.model.presets import get_preset

    preset = get_preset("tiny-2l")
    return gc.CheckEnv(args=gc.build_parser().parse_args(list(argv)), ctx=ctx, preset=preset,
                       check_preset=preset, on_gpu=on_gpu, te=te,
                       capability=(9, 0) if on_gpu else None, tf32=False, rank=0, world=1,
                       workdir=tmp_path, long_sequences=False)


def test_shared_prefix_item_fails_on_a_wrong_reward(ctx1, tmp_path):
    """(It passes without the fault: test_cpu_run_reports_every_item.)"""
    from megatron_polar.training import gpu_check as gc

    result = gc.run_item(_check_env(gc, ctx1, tmp_path, "--inject-fault", "shared_prefix"),
                         "shared_prefix", [])
    assert result.status == "fail"
    assert "local.fp32.rewards: relative error" in result.reason
    assert "--no-shared-prefix" in result.reason  # what to do about it
    # the gradients do not see the injected reward: only the rewards fail
    assert "grads" not in result.reason


def test_shared_prefix_te_variant_says_what_to_try_when_te_attention_fails(ctx1, tmp_path,
                                                                            monkeypatch):
    """The TE spec's shared-prefix attention first runs on a GPU; when it raises there (as
    TE does when no backend takes the call), the item fails with --transformer-impl local in
    the reason and the local spec's variants still pass. Here the 'TE' model is the local
    spec with its shared-prefix attention made to raise."""
    from megatron_polar.model.attention import PackedCoreAttention
    from megatron_polar.training import gpu_check as gc
    from megatron_polar.training.gpu_check.parity import check_shared_prefix

    real_build = gc.build

    def no_backend(*args, **kwargs):
        raise ValueError("No dot product attention backend is available for the provided "
                         "inputs.")

    def build(env, preset, *, bf16, use_te, fp8=None, ddp=None):
        chunks = real_build(env, preset, bf16=bf16, use_te=False, ddp=ddp)
        if use_te:
            for module in chunks[0].modules():
                if isinstance(module, PackedCoreAttention):
                    module._forward_shared_prefix = no_backend
        return chunks

    monkeypatch.setattr(gc.models, "build", build)
    f = gc.Findings()
    check_shared_prefix(_check_env(gc, ctx1, tmp_path, on_gpu=True, te=True), f)
    assert f.failures and all(m.startswith("te.bf16") for m in f.failures), f.failures
    assert "No dot product attention backend" in f.failures[0]
    assert "--transformer-impl local" in f.failures[-1]
    assert "te" not in f.figures["variants_skipped"]
    assert f.figures["te.bf16.traceback"]
    for name in ("local.fp32.rewards", "local.bf16.rewards"):
        assert f.figures[name]["rel_err"] <= f.figures[name]["tol"]


# -- the checkpoint item at DP=2 (gloo) --------------------------------------------------------

def _checkpoint_item_two_ways(out_dir):
    import megatron_polar.runtime.schedules as schedules
    from megatron_polar.training.gpu_check import main

    args = ["--allow-cpu", "--model-preset", "tiny", "--checks", "checkpoint_after_overlap"]
    assert main(args + ["--report", str(Path(out_dir) / "synced.json")]) == 0
    # Without the forced all-gather, the save races megatron's deferred parameter gather.
    schedules.sync_params = lambda chunks: None
    assert main(args + ["--report", str(Path(out_dir) / "unsynced.json")]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo/CPU test; on a GPU run torchrun")
def test_checkpoint_item_sees_the_deferred_gather_at_dp2(tmp_path):
    run_distributed(2, _checkpoint_item_two_ways, str(tmp_path))
    synced = json.loads((tmp_path / "synced.json").read_text())["items"][0]
    figures = synced["figures"]
    assert synced["status"] == "pass" and figures["dp_size"] == 2
    # The last step left each rank with the other's shard of the weights un-gathered.
    assert figures["elements_differing_across_dp_before_sync"] > 0
    assert figures["elements_differing_across_dp_after_sync"] == 0
    unsynced = json.loads((tmp_path / "unsynced.json").read_text())["items"][0]
    assert unsynced["status"] == "fail"
    assert "differ between data-parallel ranks" in unsynced["reason"]
