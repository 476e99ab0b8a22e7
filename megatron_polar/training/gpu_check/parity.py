"""Items a-c, parity of the GPU code paths with the CPU-verified ones: the local spec vs
Transformer Engine's (`te_parity`), packed vs each sequence alone (`packed_vs_unpacked`), and
the local spec's flex attention vs per-sequence attention (`flex_attention`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_polar.training.gpu_check import models
from megatron_polar.training.gpu_check.common import (FLEX_FLOOR, FLEX_RATIO, Findings,
                                                      SkipCheck, rel_err)
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
