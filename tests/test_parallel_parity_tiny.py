"""TP / PP / DP layouts of the `tiny` preset compute what one process computes (gloo, CPU).

One reference process initialises the model, saves it, scores fixed pairs and takes one
optimizer step. Each layout loads the same weights from that distributed checkpoint, scores the
same pairs, takes the same step, and saves. Rewards, metrics, grad norm and the updated weights
(read back at TP=1) must agree within 1e-5. The pairs share prompt-like prefixes and three of
them are the triplet expansion of one ranked list, so the shared-prefix layouts (the prefix
computed once, the list as one item) are checked against the same plain-packed reference.
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


def parity_items():
    """12 pairs whose sequences share a prefix (prompt and reference, as POLAR's do): pairs
    0-8 one item each, pairs 9-11 the expansion of one ranked list of three candidates (one
    item). Returns (pairs, items as (PrefixItem, the pair ids it holds in order))."""
    from megatron_polar.data.packing import PrefixItem
    from megatron_polar.model.presets import get_preset

    preset = get_preset(PRESET)
    g = torch.Generator().manual_seed(11)

    def tokens(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, preset.vocab_size - 1, (n,), generator=g).tolist()

    def candidate():
        return tokens(1, 20) + [preset.reward_token_id]

    pairs, items = [], []
    for k in range(9):
        prefix = tokens(4, 30)
        pair = (prefix + candidate(), prefix + candidate())
        pairs.append(pair)
        items.append((PrefixItem.from_pair(pair), (k,)))
    prefix = tokens(4, 30)
    ranked = [prefix + candidate() for _ in range(3)]
    pairs += [(ranked[i], ranked[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    items.append((PrefixItem.from_ranking(ranked), (9, 10, 11)))
    return pairs, items


def rewards_by_pair(packs, rewards, pair_ids_of) -> dict:
    """{pair id: [r_better, r_worse]} from the rewards `score_packed` returns for `packs`;
    `pair_ids_of(pack)` lists the pair ids of a pack's pairs in order."""
    out, at = {}, 0
    for pack in packs:
        n = len(pack.reward_positions)
        r = rewards[at: at + n]
        at += n
        index = (pack.pair_index if pack.pair_index is not None
                 else torch.arange(2 * pack.num_pairs).view(-1, 2))
        for pid, (i, j) in zip(pair_ids_of(pack), index.tolist()):
            out[pid] = [r[i].item(), r[j].item()]
    return out


def optimizer_config(distributed=False):
    from megatron.core.optimizer import OptimizerConfig

    # A large eps keeps Adam's first step linear in the gradient, so float noise in tiny
    # gradients cannot flip the sign of an update (Adam's first step is sign(g) otherwise).
    return OptimizerConfig(optimizer="adam", lr=1e-3, adam_eps=1e-3, weight_decay=0.01,
                           clip_grad=1.0, use_distributed_optimizer=distributed)


def layout_run(tp, pp, dp, out_dir, init_dir, save_init, vpp=None, distributed_optimizer=False,
               shared=False):
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

    pairs, items = parity_items()
    if shared:
        from megatron_polar.data.packing import pack_items

        mine_items = items[ctx.dp_rank::ctx.dp_size]
        packs = pack_items([item for item, _ in mine_items], BUDGET, pad_id=preset.pad_token_id)

        def pair_ids_of(pack):
            return [pid for k in pack.pair_ids for pid in mine_items[k][1]]
    else:
        mine = list(range(ctx.dp_rank, len(pairs), ctx.dp_size))
        packs = pack_pairs([pairs[i] for i in mine], BUDGET, pad_id=preset.pad_token_id)

        def pair_ids_of(pack):
            return [mine[i] for i in pack.pair_ids]
    rewards = score_packed(chunks, packs, ctx)
    optimizer = build_optimizer(chunks, optimizer_config(distributed_optimizer), ctx)
    result = train_step(chunks, optimizer, packs, ctx)
    save_model_weights(chunks, Path(out_dir) / "after")
    if ctx.is_last_stage and ctx.tp_rank == 0:
        torch.save({"rewards": rewards_by_pair(packs, rewards, pair_ids_of),
                    "metrics": vars(result.metrics), "grad_norm": result.grad_norm,
                    "tokens": sum(p.num_tokens for p in packs)},
                   Path(out_dir) / f"result_dp{ctx.dp_rank}.pt")


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
    rewards, metrics, grad_norm, tokens = {}, None, None, 0
    for f in sorted(Path(out_dir).glob("result_dp*.pt")):
        r = torch.load(f, weights_only=True)
        rewards.update(r["rewards"])
        metrics, grad_norm = r["metrics"], r["grad_norm"]
        tokens += r["tokens"]
    return rewards, metrics, grad_norm, tokens


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    run_distributed(1, layout_run, 1, 1, 1, str(root / "ref"), str(root / "init"), True)
    run_distributed(1, read_weights, str(root / "ref" / "after"), str(root / "ref_weights.pt"))
    run_distributed(1, read_weights, str(root / "init"), str(root / "init_weights.pt"))
    return root


# TP=2 (with sequence parallelism), DP=2 with the distributed optimizer and PP=2 x VPP=2 run
# through the trainer with the shipped flag sets in tests/test_shipped_configs.py.
# Shared-prefix packing (the prefix once, the ranked list as one item) at TP=1, TP=2 x PP=2
# and DP=2 against the same plain-packed single-process reference.
@pytest.mark.parametrize("tp,pp,dp,vpp,distopt,shared", [
    (1, 2, 1, None, False, False), (2, 2, 1, None, False, False), (1, 1, 2, None, False, False),
    (1, 1, 1, None, False, True), (2, 2, 1, None, False, True), (1, 1, 2, None, False, True)],
    ids=["pp2", "tp2xpp2", "dp2", "shared", "shared-tp2xpp2", "shared-dp2"])
def test_layout_matches_single_process(reference, tp, pp, dp, vpp, distopt, shared):
    out = reference / f"tp{tp}pp{pp}dp{dp}vpp{vpp}opt{int(distopt)}shared{int(shared)}"
    run_distributed(tp * pp * dp, layout_run, tp, pp, dp, str(out), str(reference / "init"),
                    False, vpp, distopt, shared)

    ref_rewards, ref_metrics, ref_norm, ref_tokens = collect(reference / "ref")
    rewards, metrics, grad_norm, tokens = collect(out)
    if shared:  # the prefixes were computed once
        assert tokens < 0.75 * ref_tokens
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
