"""TP / PP / DP layouts of the `tiny` preset compute what one process computes (gloo, CPU).

One reference process initialises the model, saves it, scores fixed pairs and takes one
optimizer step. Each layout loads the same weights from that distributed checkpoint, scores the
same pairs, takes the same step, and saves. Rewards, metrics, grad norm and the updated weights
(read back at TP=1) must agree within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed

PRESET = "tiny"
BUDGET = 160
ATOL = 1e-5


def fixed_pairs(n=12, seed=7):
    g = torch.Generator().manual_seed(seed)
    from megatron_polar.model.presets import get_preset

    preset = get_preset(PRESET)

    def seq():
        length = int(torch.randint(4, 40, (1,), generator=g))
        return torch.randint(3, preset.vocab_size - 1, (length,), generator=g).tolist() + [
            preset.reward_token_id]

    return [(seq(), seq()) for _ in range(n)]


def optimizer_config(distributed=False):
    from megatron.core.optimizer import OptimizerConfig

    # A large eps keeps Adam's first step linear in the gradient, so float noise in tiny
    # gradients cannot flip the sign of an update (Adam's first step is sign(g) otherwise).
    return OptimizerConfig(optimizer="adam", lr=1e-3, adam_eps=1e-3, weight_decay=0.01,
                           clip_grad=1.0, use_distributed_optimizer=distributed)


def layout_run(tp, pp, dp, out_dir, init_dir, save_init, vpp=None, distributed_optimizer=False):
    from megatron_polar.data.packing import pack_pairs
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.checkpoints import load_model_weights, save_model_weights
    from megatron_polar.runtime.parallel import initialize_parallel
    from megatron_polar.runtime.chunks import build_model_chunks
    from megatron_polar.runtime.schedules import score_packed
    from megatron_polar.training.optimizer import build_optimizer
    from megatron_polar.training.step import train_step

    preset = get_preset(PRESET)
    from megatron.core.distributed import DistributedDataParallelConfig

    run = ModelRunConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp)
    ctx = initialize_parallel(run)
    assert (ctx.tp_size, ctx.pp_size, ctx.dp_size) == (tp, pp, dp)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                        use_distributed_optimizer=distributed_optimizer)
    chunks = build_model_chunks(preset, run, ctx, ddp)
    assert len(chunks) == (vpp or 1)
    if save_init:
        save_model_weights(chunks, init_dir)
    else:
        load_model_weights(chunks, init_dir)

    pairs = fixed_pairs()
    mine = list(range(ctx.dp_rank, len(pairs), ctx.dp_size))
    packs = pack_pairs([pairs[i] for i in mine], BUDGET, pad_id=preset.pad_token_id)
    rewards = score_packed(chunks, packs, ctx)
    optimizer = build_optimizer(chunks, optimizer_config(distributed_optimizer), ctx)
    result = train_step(chunks, optimizer, packs, ctx)
    save_model_weights(chunks, Path(out_dir) / "after")
    if ctx.is_last_stage and ctx.tp_rank == 0:
        order = [mine[i] for pack in packs for i in pack.pair_ids]
        by_pair = {pid: rewards[2 * k: 2 * k + 2].tolist() for k, pid in enumerate(order)}
        torch.save({"rewards": by_pair, "metrics": vars(result.metrics),
                    "grad_norm": result.grad_norm}, Path(out_dir) / f"result_dp{ctx.dp_rank}.pt")


def read_weights(ckpt_dir, out_file):
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.runtime.checkpoints import load_model_weights
    from megatron_polar.runtime.parallel import initialize_parallel
    from megatron_polar.runtime.chunks import build_model_chunks, unwrap

    run = ModelRunConfig()
    ctx = initialize_parallel(run)
    chunks = build_model_chunks(get_preset(PRESET), run, ctx)
    load_model_weights(chunks, ckpt_dir)
    torch.save({k: v.clone() for k, v in unwrap(chunks[0]).state_dict().items()
                if isinstance(v, torch.Tensor)}, out_file)


def collect(out_dir):
    rewards, metrics, grad_norm = {}, None, None
    for f in sorted(Path(out_dir).glob("result_dp*.pt")):
        r = torch.load(f, weights_only=True)
        rewards.update(r["rewards"])
        metrics, grad_norm = r["metrics"], r["grad_norm"]
    return rewards, metrics, grad_norm


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    run_distributed(1, layout_run, 1, 1, 1, str(root / "ref"), str(root / "init"), True)
    run_distributed(1, read_weights, str(root / "ref" / "after"), str(root / "ref_weights.pt"))
    run_distributed(1, read_weights, str(root / "init"), str(root / "init_weights.pt"))
    return root


# TP=2 (with sequence parallelism), DP=2 with the distributed optimizer and PP=2 x VPP=2 run
# through the trainer with the shipped flag sets in tests/test_shipped_configs.py.
@pytest.mark.parametrize("tp,pp,dp,vpp,distopt", [
    (1, 2, 1, None, False), (2, 2, 1, None, False), (1, 1, 2, None, False)],
    ids=["pp2", "tp2xpp2", "dp2"])
def test_layout_matches_single_process(reference, tp, pp, dp, vpp, distopt):
    out = reference / f"tp{tp}pp{pp}dp{dp}vpp{vpp}opt{int(distopt)}"
    run_distributed(tp * pp * dp, layout_run, tp, pp, dp, str(out), str(reference / "init"),
                    False, vpp, distopt)

    ref_rewards, ref_metrics, ref_norm = collect(reference / "ref")
    rewards, metrics, grad_norm = collect(out)
    assert sorted(rewards) == sorted(ref_rewards) == list(range(12))
    for pid, value in ref_rewards.items():
        assert torch.allclose(torch.tensor(rewards[pid]), torch.tensor(value), atol=ATOL), pid
    for key in ("loss", "accuracy", "reward_chosen", "reward_rejected", "margin"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=ATOL), key
    assert metrics["num_pairs"] == ref_metrics["num_pairs"] == 12
    assert grad_norm == pytest.approx(ref_norm, abs=ATOL)

    run_distributed(1, read_weights, str(out / "after"), str(out / "weights.pt"))
    ref_w = torch.load(reference / "ref_weights.pt", weights_only=True)
    init_w = torch.load(reference / "init_weights.pt", weights_only=True)
    got_w = torch.load(out / "weights.pt", weights_only=True)
    assert ref_w.keys() == got_w.keys()
    moved = 0.0
    for name, ref in ref_w.items():
        assert torch.allclose(got_w[name], ref, atol=ATOL), name
        moved = max(moved, (ref - init_w[name]).abs().max().item())
    assert moved > 1e-4, "the optimizer step did not change the weights"
