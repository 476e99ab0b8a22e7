"""Items a-d, parity of the GPU code paths with the CPU-verified ones: the local spec vs
Transformer Engine's (`te_parity`), packed vs each sequence alone (`packed_vs_unpacked`), the
local spec's flex attention vs per-sequence attention (`flex_attention`), and shared-prefix
packs vs plain packs of the whole sequences (`shared_prefix`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_polar.training.gpu_check import models
from megatron_polar.training.gpu_check.common import (FLEX_FLOOR, FLEX_RATIO,
                                                      PER_PARAM_FACTOR, Findings, SkipCheck,
                                                      rel_err)
from megatron_polar.training.gpu_check.env import CheckEnv, free_memory
from megatron_polar.training.gpu_check.models import (compare_gradients, copy_weights,
                                                      loss_gradients, sequences)


# -- a. local vs TE spec -----------------------------------------------------------------------

def check_te_parity(env: CheckEnv, f: Findings) -> None:
    from megatron_polar.data.packing import build_padded_batch
    from megatron_polar.runtime.schedules import score_packed, score_padded

    if not env.on_gpu:
        raise SkipCheck("needs a CUDA GPU (the TE spec is only used there)")
    if not env.te:
        raise SkipCheck("Transformer Engine does not import here, so runs use the local spec "
                        "and there is nothing to compare against")
    preset, pairs = env.check_preset, env.pairs(0)
    seqs = sequences(pairs)
    # One padded (SBHD) batch of all sequences. fp32 is compared in this layout only: TE has no
    # fp32 attention for packed THD input (flash and fused attention are fp16/bf16 only, and
    # its unfused attention refuses qkv_format "thd": transformer_engine/pytorch/attention/
    # dot_product_attention/utils.py, get_attention_backend, "Filter: QKV layout").
    padded = build_padded_batch(seqs, preset.pad_token_id, pad_multiple=16)
    pack = env.pack(pairs)
    f.figures["variants_skipped"] = {"fp32.packed": "TE has no fp32 THD attention backend"}
    for dtype in ("fp32", "bf16"):
        bf16 = dtype == "bf16"
        local = models.build(env, preset, bf16=bf16, use_te=False)
        te = models.build(env, preset, bf16=bf16, use_te=True)
        f.figures[f"{dtype}.tensors_copied"] = copy_weights(local, te)
        # TE runs fp32 GEMMs in TF32 whatever torch's setting (see TOL), so fp32 is judged
        # at TF32 precision.
        r_tol, g_tol = (env.tol("bf16"), env.tol("bf16_grad")) if bf16 else \
            (env.tol("tf32"), env.tol("tf32_grad"))
        r_local = score_padded(local[0], padded)
        r_te = score_padded(te[0], padded)
        if env.injected("te_parity"):
            r_te = r_te + 1.0
        f.compare(f"{dtype}.rewards_padded", r_te, r_local, r_tol, headline=True)
        compare_gradients(f, f"{dtype}.grads_padded", loss_gradients(te, padded),
                          loss_gradients(local, padded), g_tol)
        if bf16:  # the training layout: packed THD, TE fused attention vs the local flex path
            f.compare("bf16.rewards_packed", score_packed(te, [pack], env.ctx),
                      score_packed(local, [pack], env.ctx), r_tol, headline=True)
            compare_gradients(f, "bf16.grads_packed", loss_gradients(te, pack),
                              loss_gradients(local, pack), g_tol)
        del local, te
        free_memory()


# -- b. packed vs unpacked ---------------------------------------------------------------------

def check_packed_vs_unpacked(env: CheckEnv, f: Findings) -> None:
    from megatron_polar.data.packing import build_packed_micro_batch, build_padded_batch
    from megatron_polar.runtime.schedules import score_packed, score_padded

    preset, pairs = env.check_preset, env.pairs(1)
    seqs = sequences(pairs)
    pack = env.pack(pairs)
    alone = [build_packed_micro_batch([(s,)], env.alone_len, preset.pad_token_id) for s in seqs]
    padded = [build_padded_batch([s], preset.pad_token_id, pad_multiple=env.alone_len)
              for s in seqs]
    f.figures["sequences"] = len(seqs)
    f.figures["pack_tokens"] = {"real": pack.num_tokens, "padded_to": env.pack_len}
    specs = ["local"] + (["te"] if env.te and env.on_gpu else [])
    skipped = {}
    if not (env.te and env.on_gpu):
        skipped["te"] = "no Transformer Engine on a CUDA GPU here"
    for spec in specs:
        for dtype in ("fp32", "bf16"):
            if spec == "te" and dtype == "fp32":
                skipped["te.fp32"] = "TE has no fp32 THD attention backend (see te_parity)"
                continue
            bf16 = dtype == "bf16"
            tol = env.tol("bf16") if bf16 else env.tol(env.fp32_kind)
            chunks = models.build(env, preset, bf16=bf16, use_te=spec == "te")
            r_packed = score_packed(chunks, [pack], env.ctx)
            if env.injected("packed_vs_unpacked"):
                r_packed = r_packed.clone()
                r_packed[0] += 1.0
            r_alone = score_packed(chunks, alone, env.ctx)
            r_padded = torch.cat([score_padded(chunks[0], p) for p in padded])
            f.compare(f"{spec}.{dtype}.packed_vs_alone_packed", r_packed, r_alone, tol,
                      headline=True)
            f.compare(f"{spec}.{dtype}.packed_vs_alone_padded", r_packed, r_padded, tol)
            spread = float(r_alone.float().std())
            f.figures[f"{spec}.{dtype}.reward_std"] = spread
            if not spread > 1e-3:
                f.fail(f"{spec}.{dtype}: rewards do not differ between sequences "
                       f"(std {spread:.2g}); the comparison would be vacuous")
            del chunks
            free_memory()
    f.figures["variants_skipped"] = skipped


# -- c. flex_attention -------------------------------------------------------------------------

def _per_sequence_attention(q, k, v, cu_seqlens, real: int, scale: float, gqa: bool):
    """Causal attention within each sequence, one SDPA per sequence (the CPU path of
    PackedCoreAttention); q [1, np, t, hn], k/v [1, ng, t, hn]; rows of real tokens only."""
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        outs.append(F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale,
            enable_gqa=gqa))
    return torch.cat(outs, dim=2)[:, :, :real]


def _golden_attention(q, k, v, cu_seqlens, real: int, scale: float):
    """The same in float64 with explicit math (GQA by repeating each K/V group over its query
    heads, as megatron lays heads out), independent of any fused kernel."""
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    bounds = cu_seqlens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = (q[:, :, a:b] @ k[:, :, a:b].transpose(-1, -2)) * scale
        mask = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()
        outs.append(torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v[:, :, a:b])
    return torch.cat(outs, dim=2)[:, :, :real]


def check_flex_attention(env: CheckEnv, f: Findings) -> None:
    from megatron_polar.model.attention import flex_document_attention

    preset = env.check_preset
    heads, groups, hn = preset.num_attention_heads, preset.num_query_groups, preset.head_dim
    pack = env.pack(env.pairs(2))
    cu = pack.cu_seqlens.to(env.device)
    total, real = env.pack_len, pack.num_tokens
    scale, gqa = 1.0 / math.sqrt(hn), heads != groups
    compiled = env.on_gpu  # on CUDA the model compiles flex; on CPU only its eager reference runs
    f.figures.update(shape={"heads": heads, "kv_groups": groups, "head_dim": hn,
                            "tokens": total, "real_tokens": real,
                            "sequences": int(cu.numel() - 1)},
                     compiled=compiled)
    g = torch.Generator(device="cpu").manual_seed(env.args.seed + 3)
    base = {name: torch.randn(1, n, total, hn, generator=g, dtype=torch.float64)
            for name, n in (("q", heads), ("k", groups), ("v", groups))}
    dout = torch.randn(1, heads, real, hn, generator=g, dtype=torch.float64)

    # flex_attention has no backward on CPU (torch raises NotImplementedError), so a CPU checks
    # the forward of its eager reference only.
    backward = env.on_gpu
    f.figures["backward_checked"] = backward

    def run(fn, dtype):
        x = {n: t.to(env.device, dtype).requires_grad_(backward) for n, t in base.items()}
        out = fn(x["q"], x["k"], x["v"])
        if not backward:
            return out.detach(), {}
        out.backward(dout.to(env.device, dtype))
        return out.detach(), {n: t.grad.detach()[:, :, :real] for n, t in x.items()}

    gold_out, gold_grads = run(lambda q, k, v: _golden_attention(q, k, v, cu, real, scale),
                               torch.float64)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        flex_out, flex_grads = run(
            lambda q, k, v: flex_document_attention(q, k, v, cu, scale, gqa,
                                                     compile=compiled)[:, :, :real], dtype)
        sdpa_out, sdpa_grads = run(
            lambda q, k, v: _per_sequence_attention(q, k, v, cu, real, scale, gqa), dtype)
        if env.injected("flex_attention"):
            flex_out = flex_out + 0.1
        kind = dtype_name if dtype_name == "bf16" else env.fp32_kind
        for what, got, ref_same, gold, floor_kind in (
                ("out", flex_out, sdpa_out, gold_out, kind),
                *((f"d{n}", flex_grads[n], sdpa_grads[n], gold_grads[n],
                   "bf16_grad" if dtype_name == "bf16" else kind) for n in flex_grads)):
            err_flex, err_sdpa = rel_err(got, gold), rel_err(ref_same, gold)
            bound = max(FLEX_RATIO * err_sdpa, FLEX_FLOOR[floor_kind]) * env.tolerance_scale
            f.figures[f"{dtype_name}.{what}"] = {"flex_rel_err": err_flex,
                                                 "sdpa_rel_err": err_sdpa, "bound": bound,
                                                 "flex_vs_sdpa_rel_err": rel_err(got, ref_same)}
            if not err_flex <= bound:
                f.fail(f"{dtype_name}.{what}: flex error {err_flex:.3g} against fp64 exceeds "
                       f"{bound:.3g} (per-sequence SDPA: {err_sdpa:.3g})")
        f.headline_parts.append(
            f"{dtype_name} out {f.figures[f'{dtype_name}.out']['flex_rel_err']:.1e}")


# -- d. shared-prefix packs --------------------------------------------------------------------

def _shared_prefix_items(env: CheckEnv) -> list:
    """Four pairs and one ranked list of four candidates, each item with a prompt-like prefix
    of its own (a few hundred tokens on a GPU, tens on a CPU, a reward token inside it as
    POLAR's `prompt reference <|reward|> prompt` has) before candidates of `env.pairs`'
    lengths. Returns the `PrefixItem`s."""
    from megatron_polar.data.packing import PrefixItem

    preset = env.check_preset
    g = torch.Generator().manual_seed(env.args.seed + 5)
    lo, hi = (256, 384) if env.gpu_lengths else (16, 48)
    candidates = sequences(env.pairs(4, n_pairs=6))  # 12, each ending in the reward token

    def prefix():
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, preset.vocab_size - 1, (n,), generator=g).tolist()
        ids[2 * n // 3] = preset.reward_token_id
        return ids

    items = []
    for k in range(4):
        p = prefix()
        items.append(PrefixItem.from_pair((p + candidates[2 * k], p + candidates[2 * k + 1])))
    p = prefix()
    items.append(PrefixItem.from_ranking([p + c for c in candidates[8:12]]))
    return items


def _bins(lengths: list, budget: int) -> list:
    from megatron_polar.data.packing import best_fit_decreasing

    return [sorted(b) for b in best_fit_decreasing(lengths, budget)]


def _shared_prefix_packs(env: CheckEnv, items: list) -> tuple[list, list, list]:
    """(plain packs, shared packs, the pair ids of every item). Plain: the items expanded into
    pairs of whole sequences (a ranked list into its every ordered pair, as plain training
    sees it), s+ and s- of each, packed at `env.pack_len` (the other items' pack shape, so
    the GPU reuses their flex kernels). Shared: the items, prefix once, at the same length.
    Pair ids number the ordered pairs of all items in item order."""
    from megatron_polar.data.packing import build_packed_micro_batch, build_shared_micro_batch

    pad, pairs, ids_of_item = env.check_preset.pad_token_id, [], []
    for item in items:
        seqs = [list(item.prefix) + list(c) for c in item.candidates]
        ids_of_item.append(list(range(len(pairs), len(pairs) + len(item.pairs))))
        pairs += [(seqs[i], seqs[j]) for i, j in item.pairs]
    plain = [build_packed_micro_batch([pairs[i] for i in b], env.pack_len, pad, pair_ids=b)
             for b in _bins([len(a) + len(b) for a, b in pairs], env.pack_len)]
    shared = [build_shared_micro_batch([items[i] for i in b], env.pack_len, pad, item_ids=b)
              for b in _bins([item.computed_length for item in items], env.pack_len)]
    return plain, shared, ids_of_item


def _rewards_by_pair(packs, rewards: torch.Tensor, ids_of_item: list) -> torch.Tensor:
    """[pairs, 2] (better, worse) rewards in pair-id order from `score_packed`'s rewards of
    `packs` (plain packs: s+, s- of each pair; shared packs: each candidate once, read
    through the pack's `pair_index`)."""
    out = torch.full((sum(len(ids) for ids in ids_of_item), 2), float("nan"),
                     dtype=torch.float64)
    at = 0
    for pack in packs:
        n = len(pack.reward_positions)
        r = rewards[at: at + n].double()
        at += n
        if pack.pair_index is None:
            ids, index = list(pack.pair_ids), torch.arange(n).view(-1, 2)
        else:
            ids = [pid for k in pack.pair_ids for pid in ids_of_item[k]]
            index = pack.pair_index
        out[ids] = r[index]
    return out


def _step_gradients(env: CheckEnv, chunks, packs) -> dict:
    """Weight gradients (fp32, by checkpoint key) of the summed pair loss over `packs`, through
    training's own path: megatron's forward-backward schedule with `pair_forward_step`, whose
    `pairwise_loss` reads a shared pack's `pair_index` (`models.loss_gradients` alternates
    s+/s- and so takes plain batches only). No optimizer is built, so the schedule neither
    scales the loss nor finalizes (all-reduces, divides) the gradients: every rank keeps the
    plain sum of its own packs."""
    from megatron_polar.runtime.schedules import run_schedule
    from megatron_polar.training.step import pair_forward_step

    for chunk in chunks:
        chunk.zero_grad_buffer()
        chunk.train()
    run_schedule(chunks, packs, forward_only=False, ctx=env.ctx, forward_step=pair_forward_step)
    return models.collect_gradients(chunks)


def _judge_against_truth(env: CheckEnv, f: Findings, name: str, shared: dict, plain: dict,
                         truth: dict) -> None:
    """bf16 gradients of the shared packs against fp32 `truth` (plain packs, same weights): at
    most FLEX_RATIO times the plain packs' error, or the bf16 floor; each tensor within
    PER_PARAM_FACTOR times that."""
    if not set(shared) == set(plain) == set(truth):
        f.fail(f"{name}: gradients of different tensors "
               f"({sorted((set(shared) | set(plain)) ^ set(truth))[:3]})")
        return
    err_shared, per_shared = models.gradient_errors(shared, truth)
    err_plain, _ = models.gradient_errors(plain, truth)
    bound = max(FLEX_RATIO * err_plain, FLEX_FLOOR["bf16_grad"]) * env.tolerance_scale
    worst = sorted(per_shared.items(), key=lambda kv: -kv[1])[:3]
    f.figures[name] = {"shared_rel_err_vs_fp32": err_shared,
                       "plain_rel_err_vs_fp32": err_plain, "bound": bound,
                       "shared_vs_plain_rel_err": models.gradient_errors(shared, plain)[0],
                       "tensors": len(truth), "worst_tensors": dict(worst),
                       "per_tensor_bound": PER_PARAM_FACTOR * bound,
                       "truth": "local spec in fp32" + (" (TF32 GEMMs)" if env.tf32 else "")}
    f.headline_parts.append(f"{name} {err_shared:.1e} (plain {err_plain:.1e}) vs fp32")
    if not err_shared <= bound:
        f.fail(f"{name}: relative error {err_shared:.3g} against fp32 exceeds {bound:.3g} "
               f"(plain packs: {err_plain:.3g})")
    bad = [(k, v) for k, v in per_shared.items() if not v <= PER_PARAM_FACTOR * bound]
    if bad:
        f.fail(f"{name}: {len(bad)} tensor(s) beyond {PER_PARAM_FACTOR * bound:.3g} against "
               f"fp32, e.g. {bad[0][0]} at {bad[0][1]:.3g}")


_TE_HINT = ("the TE spec's shared-prefix attention (megatron_polar/model/te_attention.py: TE THD "
            "attention, different q/kv lengths, padding_causal_bottom_right) runs here for the "
            "first time; until it is fixed train with --transformer-impl local (the local "
            "spec's shared-prefix path is checked above) or with --no-shared-prefix")
_LOCAL_HINT = ("shared-prefix packing is wrong on the local spec here (flex_shared_prefix_"
               "attention on CUDA, per-segment SDPA on CPU: megatron_polar/model/attention.py); "
               "train with --no-shared-prefix until it is fixed")


def check_shared_prefix(env: CheckEnv, f: Findings) -> None:
    from megatron_polar.runtime.schedules import score_packed

    preset = env.check_preset
    items = _shared_prefix_items(env)
    plain, shared, ids_of_item = _shared_prefix_packs(env, items)
    plain_real, shared_real = (sum(p.num_tokens for p in packs) for packs in (plain, shared))
    f.figures["items"] = {"pairs": 4, "ranked_lists": 1, "candidates_per_list": 4,
                          "ordered_pairs": sum(len(i.pairs) for i in items),
                          "prefix_lengths": [len(i.prefix) for i in items]}
    f.figures["tokens"] = {
        "plain": plain_real, "shared": shared_real,
        "plain_padded": sum(p.tokens.shape[1] for p in plain),
        "shared_padded": sum(p.tokens.shape[1] for p in shared),
        "plain_packs": len(plain), "shared_packs": len(shared), "pack_len": env.pack_len,
        "saving": 1.0 - shared_real / max(plain_real, 1)}
    f.headline_parts.append(f"tokens {plain_real} plain -> {shared_real} shared")
    if not shared_real < plain_real:
        f.fail(f"the shared-prefix packs compute {shared_real} tokens, no fewer than the plain "
               f"packs' {plain_real}: the items have no common prefix and the check is vacuous")

    te_here = env.te and env.on_gpu
    variants = [("local", "fp32"), ("local", "bf16")] + ([("te", "bf16")] if te_here else [])
    skipped = {"te.fp32": "TE has no fp32 THD attention backend (see te_parity)"}
    if not te_here:
        skipped["te"] = "no Transformer Engine on a CUDA GPU here"
    f.figures["variants_skipped"] = skipped
    f.figures["attention"] = {
        "local": ("flex_shared_prefix_attention (compiled)" if env.on_gpu
                  else "per-segment SDPA (the CPU path)"),
        **({"te": "SharedPrefixTEAttention (TE THD, padding_causal_bottom_right)"}
           if te_here else {})}
    for spec, dtype in variants:
        name, bf16 = f"{spec}.{dtype}", dtype == "bf16"
        r_tol = env.tol("bf16") if bf16 else env.tol(env.fp32_kind)
        failures_before = len(f.failures)
        chunks = None
        try:
            chunks = models.build(env, preset, bf16=bf16, use_te=spec == "te")
            r_plain = _rewards_by_pair(plain, score_packed(chunks, plain, env.ctx), ids_of_item)
            r_shared = _rewards_by_pair(shared, score_packed(chunks, shared, env.ctx),
                                        ids_of_item)
            if env.injected("shared_prefix"):
                r_shared = r_shared.clone()
                r_shared[0, 0] += 1.0
            f.compare(f"{name}.rewards", r_shared, r_plain, r_tol, headline=True)
            spread = float(r_plain.float().std())
            f.figures[f"{name}.reward_std"] = spread
            if not spread > 1e-3:
                f.fail(f"{name}: rewards do not differ between sequences (std {spread:.2g}); "
                       "the comparison would be vacuous")
            g_shared, g_plain = (_step_gradients(env, chunks, packs) for packs in (shared, plain))
            if not bf16:
                compare_gradients(f, f"{name}.grads", g_shared, g_plain, env.tol(
                    "tf32_grad" if env.fp32_kind == "tf32" else "fp32"))
            else:
                # bf16 gradients of two layouts differ by bf16's own noise (~3% of the
                # gradient: the prefix's gradient is one sum where plain packs round each
                # copy's), as large as either's distance from the truth; so each is measured
                # against fp32 gradients of the same weights, as flex_attention's outputs are.
                truth = models.build(env, preset, bf16=False, use_te=False)
                copy_weights(chunks, truth)
                g_truth = _step_gradients(env, truth, plain)
                del truth
                _judge_against_truth(env, f, f"{name}.grads", g_shared, g_plain, g_truth)
        except Exception as e:  # the TE attention's first run may crash: say what to try
            if spec != "te":
                raise
            import traceback

            f.figures[f"{name}.traceback"] = traceback.format_exc().splitlines()[-12:]
            f.fail(f"{name}: {type(e).__name__}: {e}")
        finally:
            del chunks
            free_memory()
        if any("vacuous" not in m for m in f.failures[failures_before:]):
            f.fail(f"{name}: " + (_TE_HINT if spec == "te" else _LOCAL_HINT))
