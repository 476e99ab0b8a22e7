"""`make gpu-check`: what to run first on a new GPU node (one GPU, or `torchrun` on eight).

Each item is a named check with a status (pass / fail / skip with its reason), its figures and
its peak GPU memory; the report is one JSON file and a table on stdout, and the exit status is
non-zero when an item failed.

  te_parity                 local layer spec vs Transformer Engine's on the same weights: rewards
                            and weight gradients, fp32 and bf16 (TE only)
  packed_vs_unpacked        rewards of sequences packed in one THD micro-batch = each scored alone
                            (as a pack of one, and padded), per spec and dtype
  flex_attention            the local spec's CUDA attention (`flex_document_attention`) vs
                            per-sequence attention, forward and backward, against an fp64 truth
  fp8_step                  train steps with FP8 (TE, sm90+) vs bf16 on the same batch and weights
  checkpoint_after_overlap  distributed optimizer with overlapped grad reduce / param gather:
                            after `sync_params`, every weight is its owner's fp32 main param cast
                            to bf16, identical on all DP ranks, saved as it is live
  tp_comm_overlap           TE spec at TP >= 2 with sequence parallelism: a train step and the
                            rewards with `--tp-comm-overlap` (TE userbuffers) vs without, same
                            weights and pack (TE, CUDA, torchrun with
                            `--tensor-model-parallel-size` >= 2; the only item run at TP > 1)
  peak_memory               peak torch.cuda memory per item and overall
  throughput                training steps of the full preset (1.8B by default) at TP=1: tokens/s,
                            TFLOP/s, MFU

The checks of correctness run a shortened copy of the preset (`--check-layers`, default 4
layers of the real widths) so the whole tool takes minutes. On a machine without CUDA the tool
refuses to run unless `--allow-cpu` is given; then the checks that can run on a CPU (packing,
flex's eager reference, the checkpoint check on gloo, a short throughput run) run and the others
are skipped with their reason; this is what the tests use.

Every item but `tp_comm_overlap` runs at TP=1 (the default `--tensor-model-parallel-size 1`); a
run started at TP > 1 skips them with that reason and runs `tp_comm_overlap` (and peak_memory):
  torchrun --nproc-per-node 8 tools/gpu_check.py --tensor-model-parallel-size 2 \
      --checks tp_comm_overlap

Written against megatron-core 0.16.1; GPU-only calls cite the upstream lines they rely on.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

ITEMS = ("te_parity", "packed_vs_unpacked", "flex_attention", "fp8_step",
         "checkpoint_after_overlap", "tp_comm_overlap", "peak_memory", "throughput")
# The items that run when the tool was started at TP > 1; the others assume TP=1 and skip there.
ITEMS_AT_TP = ("tp_comm_overlap", "peak_memory")
TITLES = {
    "te_parity": "local spec vs Transformer Engine spec (same weights)",
    "packed_vs_unpacked": "packed THD micro-batch vs each sequence alone",
    "flex_attention": "flex_attention document mask vs per-sequence attention",
    "fp8_step": "FP8 train steps vs bf16 on the same batch",
    "checkpoint_after_overlap": "checkpoint after overlapped distributed-optimizer steps",
    "tp_comm_overlap": "--tp-comm-overlap (TE userbuffers) vs without at TP >= 2",
    "peak_memory": "peak GPU memory per item",
    "throughput": "training throughput, TFLOP/s and MFU",
}
NO_GPU_MESSAGE = "no CUDA GPU: gpu-check runs on a GPU node; `make test` covers CPU"

# Tolerances: relative L2 error ||got - ref|| / ||ref|| over all compared values (rewards of
# all sequences; all weight gradients of the model), unless said otherwise.
TOL = {
    # Same maths, different kernels and summation orders, strict fp32 GEMMs: relative errors
    # ~1e-6 per op, a few layers deep.
    "fp32": 1e-4,
    # fp32 with TF32 GEMMs: Transformer Engine always runs fp32 GEMMs with
    # CUBLAS_COMPUTE_32F_FAST_TF32 (transformer_engine/common/gemm/cublaslt_gemm.cu: "default
    # to tf32 except for e5m2 inputs"), and torch does when TF32 is enabled (the NGC containers
    # set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1). TF32 keeps 10 mantissa bits: unit roundoff
    # 2^-11 = 4.9e-4 per operand, ~1e-3 per GEMM, a few layers deep.
    "tf32": 5e-3,
    "tf32_grad": 1e-2,
    # bf16 (8 mantissa bits, unit roundoff 2^-8 = 3.9e-3) with fp32 accumulation; kernels round
    # at different points (TE fuses RMSNorm into the next GEMM, accumulates weight gradients in
    # fp32 where the local spec rounds them to bf16 first).
    "bf16": 2e-2,
    "bf16_grad": 5e-2,
    # FP8 E4M3 forward (3 mantissa bits: rounding error <= 6.25%, ~2.5% RMS per operand, ~3.5%
    # per GEMM output), E5M2 gradients in the hybrid format. Errors add into the residual stream
    # rather than multiply, so rewards move by a few % of their spread; the mean loss over the
    # pairs moves less (the noise averages out).
    "fp8_loss": 5e-2,
    "fp8_reward": 1e-1,
}
# A single parameter's gradient may be this many times worse than the whole model's (small
# tensors such as norm weights sum over all tokens and are noisier), no more.
PER_PARAM_FACTOR = 5.0
# flex_attention vs an fp64 truth: at most this many times the error of the per-sequence SDPA
# in the same dtype (the way PyTorch's flex tests judge it), or the floor, whichever is larger.
FLEX_RATIO = 2.0
FLEX_FLOOR = {"fp32": 1e-5, "tf32": 2e-3, "bf16": 5e-3, "bf16_grad": 1e-2}


class SkipCheck(Exception):
    """This item cannot run on this machine; the message says why."""


@dataclass
class ItemResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    reason: Optional[str]  # why it failed or was skipped
    headline: str
    figures: dict
    seconds: float
    peak_memory_gib: Optional[float]
    peak_reserved_gib: Optional[float] = None
    failed_ranks: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "title": TITLES[self.name], "status": self.status,
                "reason": self.reason, "headline": self.headline, "figures": self.figures,
                "seconds": round(self.seconds, 2), "peak_memory_gib": self.peak_memory_gib,
                "peak_reserved_gib": self.peak_reserved_gib, "failed_ranks": self.failed_ranks}


class Findings:
    """Figures and failures of one item."""

    def __init__(self):
        self.figures: dict = {}
        self.failures: list[str] = []
        self.headline_parts: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def compare(self, name: str, got: torch.Tensor, ref: torch.Tensor, tol: float,
                headline: bool = False) -> float:
        """Relative L2 error of `got` against `ref`, recorded under `name`; a failure if > tol."""
        err = rel_err(got, ref)
        diff = (got.detach().double() - ref.detach().double().to(got.device)).abs()
        self.figures[name] = {"rel_err": err, "tol": tol,
                              "max_abs_err": float(diff.max()) if diff.numel() else 0.0}
        if not err <= tol:  # NaN fails too
            self.fail(f"{name}: relative error {err:.3g} > tolerance {tol:.3g}")
        if headline:
            self.headline_parts.append(f"{name} {err:.1e}")
        return err


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double().to(got.device)
    if got.shape != ref.shape:
        return float("nan")
    denom = float(ref.norm())
    return float((got - ref).norm()) / max(denom, 1e-30)


# -- environment -------------------------------------------------------------------------------

@dataclass
class CheckEnv:
    args: argparse.Namespace
    ctx: object  # ParallelContext
    preset: object  # the full ModelPreset (throughput)
    check_preset: object  # the shortened one (correctness items)
    on_gpu: bool
    te: bool  # Transformer Engine imports
    capability: Optional[tuple]
    tf32: bool
    rank: int
    world: int
    workdir: Path
    tolerance_scale: float = 1.0
    long_sequences: Optional[bool] = None  # GPU-sized sequences; None: on a GPU

    def tol(self, kind: str) -> float:
        return TOL[kind] * self.tolerance_scale

    @property
    def device(self) -> torch.device:
        from megatron_polar.runtime.device import compute_device

        return compute_device()

    @property
    def fp32_kind(self) -> str:
        """The tolerance for fp32 GEMMs through torch on this machine."""
        return "tf32" if self.tf32 else "fp32"

    def injected(self, item: str) -> bool:
        return self.args.inject_fault == item

    # Sequence lengths of the correctness items: 4 pairs packed into `pack_len` tokens; each
    # sequence alone into `alone_len`. On a GPU both are one length: the local spec compiles
    # flex_attention once per bucketed pack length (`flex_bucket` in
    # megatron_polar/model/attention.py), and every compilation costs tens of seconds; the
    # items share these shapes so that they share the kernels.
    @property
    def gpu_lengths(self) -> bool:
        return self.on_gpu if self.long_sequences is None else self.long_sequences

    @property
    def seq_range(self) -> tuple[int, int]:
        return (32, 240) if self.gpu_lengths else (4, 40)

    @property
    def pack_len(self) -> int:
        return _round_up(8 * self.seq_range[1], 128)

    @property
    def alone_len(self) -> int:
        return self.pack_len if self.gpu_lengths else _round_up(self.seq_range[1], 16)

    def pairs(self, seed_offset: int, n_pairs: int = 4) -> list:
        g = torch.Generator().manual_seed(self.args.seed + seed_offset)
        lo, hi = self.seq_range
        preset = self.check_preset

        def seq():
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            ids = torch.randint(3, preset.vocab_size - 1, (n - 1,), generator=g).tolist()
            return ids + [preset.reward_token_id]

        return [(seq(), seq()) for _ in range(n_pairs)]

    def pack(self, pairs):
        from megatron_polar.data.packing import build_packed_micro_batch

        return build_packed_micro_batch(pairs, self.pack_len, self.check_preset.pad_token_id)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def tf32_enabled() -> bool:
    """Whether torch's fp32 CUDA matmuls run as TF32 (set by the user or by the NGC containers'
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which `allow_tf32` reports)."""
    if not torch.cuda.is_available():
        return False
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision not in (None, "none"):
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def environment_info(env: Optional[CheckEnv]) -> dict:
    import megatron.core

    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "megatron_core": getattr(megatron.core, "__version__", None),
        "transformer_engine": None,
    }
    if env is not None and env.te:
        import transformer_engine

        info["transformer_engine"] = getattr(transformer_engine, "__version__", "unknown")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(device=torch.cuda.get_device_name(),
                    capability=list(torch.cuda.get_device_capability()),
                    device_memory_gib=round(props.total_memory / 2**30, 2),
                    devices_visible=torch.cuda.device_count(),
                    tf32_matmul=tf32_enabled(),
                    tf32_override_env=os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"))
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads)",
                    capability=None, device_memory_gib=None, devices_visible=0)
    return info


# -- model helpers -----------------------------------------------------------------------------

def build(env: CheckEnv, preset, *, bf16: bool, use_te: bool, fp8: Optional[tuple] = None,
          ddp=None, **run_fields) -> list:
    """Model chunks of `preset` through the trainer's own builder (`build_model_chunks`);
    `run_fields` are further ModelRunConfig fields (the parallel layout of tp_comm_overlap)."""
    from megatron_polar.model.config import FP8Config, ModelRunConfig
    from megatron_polar.runtime.chunks import build_model_chunks

    fp8_config = FP8Config(format=fp8[0], recipe=fp8[1]) if fp8 else FP8Config()
    run = ModelRunConfig(bf16=bf16, use_transformer_engine=use_te, fp8=fp8_config,
                         seed=env.args.seed, **run_fields)
    return build_model_chunks(preset, run, env.ctx, ddp)


def keyed_tensors(chunks) -> dict:
    """{checkpoint key: the live parameter} from megatron's sharded state dict.

    The keys are the same for the local and the TE spec: the local spec maps its separate norms
    onto TE's fused names (megatron/core/models/gpt/gpt_layer_specs.py 0.16.1, lines 417-420:
    "input_layernorm." -> "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm." ->
    "mlp.linear_fc1.layer_norm_"), which is what makes checkpoints portable between specs.
    The tensors are the parameters themselves (state_dict(keep_vars=True)); SwiGLU's fc1 comes
    as a ShardedTensorFactory whose `data` is the parameter (transformer/mlp.py:261-266).
    Module extra state (ShardedObjects: TE's FP8 metadata) is left out.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_polar.runtime.checkpoints import model_sharded_state_dict

    out = {}
    for leaf in nested_values(model_sharded_state_dict(chunks)):
        if isinstance(leaf, (ShardedTensor, ShardedTensorFactory)) \
                and isinstance(leaf.data, torch.Tensor) and leaf.data.numel() > 0:
            out[leaf.key] = leaf.data
    return out


def copy_weights(src_chunks, dst_chunks) -> int:
    """Copy every weight of `src` into `dst` by checkpoint key; both must hold the same keys and
    shapes. Returns the number of tensors copied."""
    src, dst = keyed_tensors(src_chunks), keyed_tensors(dst_chunks)
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise RuntimeError(f"weights do not map between the models: the target has "
                           f"{missing[:3]} the source lacks, the source has {extra[:3]} "
                           "the target lacks")
    with torch.no_grad():
        for key, tensor in dst.items():
            if tensor.shape != src[key].shape:
                raise RuntimeError(f"{key}: shape {tuple(src[key].shape)} does not fit "
                                   f"{tuple(tensor.shape)}")
            tensor.copy_(src[key])
    return len(dst)


def loss_gradients(chunks, batch) -> dict:
    """Weight gradients (fp32, by checkpoint key) of the summed pair loss -log sigmoid(r+ - r-)
    over `batch` (a PackedMicroBatch or a PaddedBatch of s+_0, s-_0, s+_1, ...), one forward
    and backward outside megatron's schedules. Gradients land in megatron DDP's `main_grad`
    buffers (distributed/distributed_data_parallel.py:436-441, or TE's fused wgrad
    accumulation with gradient_accumulation_fusion); without overlap_grad_reduce nothing is
    communicated, so every rank keeps its own."""
    from megatron_polar.data.packing import PackedMicroBatch
    from megatron_polar.model.reward_model import rewards_at
    from megatron_polar.runtime.device import compute_device

    chunk = chunks[0]
    device = compute_device()
    chunk.zero_grad_buffer()
    chunk.train()
    if hasattr(chunk, "set_is_first_microbatch"):  # as megatron's schedules do (schedules.py:404)
        chunk.set_is_first_microbatch()
    if isinstance(batch, PackedMicroBatch):
        tokens, position_ids, params = batch.model_inputs(device)
        scores = chunk(tokens, position_ids, None, packed_seq_params=params)
    else:
        scores = chunk(batch.tokens.to(device), batch.position_ids.to(device), None)
    rewards = rewards_at(scores, batch.reward_positions.to(device))
    loss = -F.logsigmoid(rewards[0::2] - rewards[1::2]).sum()
    loss.backward()
    grads = {}
    for key, param in keyed_tensors(chunks).items():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            grads[key] = grad.detach().float().clone()
    chunk.zero_grad_buffer()
    return grads


def compare_gradients(findings: Findings, name: str, got: dict, ref: dict, tol: float) -> None:
    """Whole-model relative error within `tol`, and every tensor within PER_PARAM_FACTOR x tol."""
    if set(got) != set(ref):
        findings.fail(f"{name}: gradients of different tensors "
                      f"({sorted(set(got) ^ set(ref))[:3]})")
        return
    num = den = 0.0
    per_param = {}
    for key in ref:
        d = (got[key].double() - ref[key].double().to(got[key].device)).norm().item()
        r = ref[key].double().norm().item()
        num, den = num + d * d, den + r * r
        per_param[key] = d / max(r, 1e-30)
    total = math.sqrt(num) / max(math.sqrt(den), 1e-30)
    worst = sorted(per_param.items(), key=lambda kv: -kv[1])[:3]
    findings.figures[name] = {"rel_err": total, "tol": tol, "tensors": len(ref),
                              "worst_tensors": {k: v for k, v in worst},
                              "per_tensor_tol": PER_PARAM_FACTOR * tol}
    findings.headline_parts.append(f"{name} {total:.1e}")
    if not total <= tol:
        findings.fail(f"{name}: relative error {total:.3g} > tolerance {tol:.3g}")
    bad = [(k, v) for k, v in per_param.items() if not v <= PER_PARAM_FACTOR * tol]
    if bad:
        findings.fail(f"{name}: {len(bad)} tensor(s) beyond {PER_PARAM_FACTOR * tol:.3g}, "
                      f"e.g. {bad[0][0]} at {bad[0][1]:.3g}")


def sequences(pairs) -> list:
    return [seq for pair in pairs for seq in pair]


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
        local = build(env, preset, bf16=bf16, use_te=False)
        te = build(env, preset, bf16=bf16, use_te=True)
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
            chunks = build(env, preset, bf16=bf16, use_te=spec == "te")
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


# -- d. FP8 ------------------------------------------------------------------------------------

def check_fp8_step(env: CheckEnv, f: Findings) -> None:
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.schedules import score_packed
    from megatron_polar.training.step import build_optimizer, train_step

    if not env.on_gpu:
        raise SkipCheck("needs a CUDA GPU with Transformer Engine")
    if not env.te:
        raise SkipCheck("Transformer Engine does not import here (FP8 runs through it)")
    if env.capability is None or env.capability < (9, 0):
        raise SkipCheck(f"FP8 needs compute capability >= 9.0 (Hopper); this GPU is "
                        f"{env.capability}")
    preset = env.check_preset
    fp8 = (env.args.fp8_format, env.args.fp8_recipe)
    # The FP8 context is megatron's own: TransformerBlock.forward enters get_fp8_context(config)
    # when config.fp8 is set (transformer/transformer_block.py:711-721), which is TE's
    # fp8_autocast with the recipe of config.fp8_recipe (fp8_utils.py:536-650).
    reference = build(env, preset, bf16=True, use_te=True)
    quantized = build(env, preset, bf16=True, use_te=True, fp8=fp8)
    copy_weights(reference, quantized)
    packs = [env.pack(env.pairs(4)), env.pack(env.pairs(5))]
    # lr 0: the weights stay those copied, so every step compares the same model on the same
    # batch; the steps before the last fill delayed scaling's amax history (its first step
    # quantizes with scale 1, before any amax is known).
    optimizer_config = OptimizerConfig(optimizer="adam", lr=0.0, bf16=True,
                                       params_dtype=torch.bfloat16, clip_grad=1.0)
    results = {}
    for name, chunks in (("bf16", reference), ("fp8", quantized)):
        optimizer = build_optimizer(chunks, optimizer_config, env.ctx)
        steps = [train_step(chunks, optimizer, packs, env.ctx)
                 for _ in range(env.args.fp8_steps)]
        rewards = score_packed(chunks, packs, env.ctx)
        results[name] = (steps, rewards)
    (b_steps, b_rewards), (q_steps, q_rewards) = results["bf16"], results["fp8"]
    f.figures.update(format=fp8[0], recipe=fp8[1], steps=env.args.fp8_steps,
                     loss_bf16=[s.metrics.loss for s in b_steps],
                     loss_fp8=[s.metrics.loss for s in q_steps],
                     grad_norm_bf16=[s.grad_norm for s in b_steps],
                     grad_norm_fp8=[s.grad_norm for s in q_steps])
    loss_b, loss_q = b_steps[-1].metrics.loss, q_steps[-1].metrics.loss
    if env.injected("fp8_step"):
        loss_q *= 2.0
    loss_err = abs(loss_q - loss_b) / max(abs(loss_b), 1e-30)
    tol = env.tol("fp8_loss")
    f.figures["loss_rel_err"] = {"rel_err": loss_err, "tol": tol}
    f.headline_parts.append(f"loss {loss_b:.4f} vs {loss_q:.4f} ({loss_err:.1e})")
    if not loss_err <= tol:
        f.fail(f"last-step loss: FP8 {loss_q:.5g} vs bf16 {loss_b:.5g}, relative "
               f"{loss_err:.3g} > {tol:.3g}")
    f.compare("rewards_after_steps", q_rewards, b_rewards, env.tol("fp8_reward"), headline=True)
    for step in q_steps:
        if not step.update_successful:
            f.fail("an FP8 step was skipped (non-finite loss or gradient norm)")
            break


# -- e. checkpoint after overlapped steps ------------------------------------------------------

def _cross_rank_mismatches(tensors: dict, group) -> int:
    """Elements that differ between the data-parallel ranks (max != min over the group)."""
    if torch.distributed.get_world_size(group) == 1:
        return 0
    bad = 0
    for key in sorted(tensors):
        t = tensors[key].detach().float()  # exact for bf16; all backends reduce fp32
        hi, lo = t.clone(), t.clone()
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
        bad += int((hi != lo).sum())
    return bad


def _main_param_mismatches(optimizer) -> tuple[int, int]:
    """(elements checked, elements that differ): each model parameter's slice owned by this
    DP rank against the distributed optimizer's fp32 main copy cast to the model dtype.
    megatron stores that copy on the parameter (`model_param.main_param`,
    optimizer/distrib_optimizer.py:410-412) for the param range of
    `_get_model_param_range_map(param)["param"]` (:610-619), and copies it into the param
    buffer after each step (`_copy_main_params_to_model_params`, :2429-2479)."""
    checked = bad = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(opt, "model_float16_groups", []):
            for param in group:
                main = getattr(param, "main_param", None)
                if main is None:
                    continue
                span = opt._get_model_param_range_map(param)["param"]
                live = param.detach().view(-1)[span.start:span.end]
                checked += live.numel()
                bad += int((live != main.to(live.dtype)).sum())
    return checked, bad


def check_checkpoint_after_overlap(env: CheckEnv, f: Findings) -> None:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.checkpoints import load_model_weights, save_model_weights
    from megatron_polar.runtime.schedules import score_packed, sync_params
    from megatron_polar.training.step import build_optimizer, train_step

    ctx, preset = env.ctx, env.check_preset
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                        overlap_grad_reduce=True, overlap_param_gather=True)
    chunks = build(env, preset, bf16=True, use_te=None, ddp=ddp)
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, clip_grad=1.0,
        use_distributed_optimizer=True), ctx)
    initial = {k: t.detach().clone() for k, t in keyed_tensors(chunks).items()}
    steps = []
    for step in range(env.args.checkpoint_steps):
        # Each DP rank trains on its own pairs, as in training: the ranks' updates must meet.
        pack = env.pack(env.pairs(100 + 10 * step + ctx.dp_rank))
        steps.append(train_step(chunks, optimizer, [pack], ctx))
    f.figures.update(dp_size=ctx.dp_size, steps=len(steps),
                     losses=[s.metrics.loss for s in steps])
    if not all(s.update_successful for s in steps):
        f.fail("a training step was skipped (non-finite loss or gradient norm)")
    live = keyed_tensors(chunks)
    # With overlap_param_gather the last step leaves other ranks' shards of the weights
    # un-gathered until the next forward (distrib_optimizer.py:2598-2623); at DP > 1 this
    # count shows the check sees that (at DP = 1 there is nothing to gather).
    f.figures["elements_differing_across_dp_before_sync"] = _cross_rank_mismatches(live, ctx.pg.dp)
    sync_params(chunks)
    checked, bad = _main_param_mismatches(optimizer)
    f.figures["main_param_elements_checked"] = checked
    f.figures["main_param_mismatches"] = bad
    if checked == 0:
        f.fail("found no distributed-optimizer main params to compare with")
    if bad:
        f.fail(f"{bad} weight elements differ from the optimizer's fp32 main params cast to "
               "bf16 after sync_params")
    across = _cross_rank_mismatches(live, ctx.pg.dp)
    f.figures["elements_differing_across_dp_after_sync"] = across
    if across:
        f.fail(f"{across} weight elements differ between data-parallel ranks after sync_params")
    changed = sum(not torch.equal(live[k], initial[k]) for k in initial)
    f.figures["tensors_changed_by_training"] = f"{changed}/{len(initial)}"
    if changed < 0.9 * len(initial):
        f.fail(f"only {changed} of {len(initial)} weight tensors changed in training; the "
               "check needs weights that moved")
    snapshot = {k: t.detach().clone() for k, t in live.items()}

    # Save, then run a forward: its pre-hooks would complete any all-gather still pending
    # (distributed_data_parallel.py:384-415), so a save that raced the gather would differ.
    root = env.workdir / "checkpoint_after_overlap"
    save_model_weights(chunks, root / "weights")
    if env.injected("checkpoint_after_overlap"):
        with torch.no_grad():
            next(iter(live.values())).view(-1)[0] += 1.0
    probe = env.pack(env.pairs(7))
    r_live = score_packed(chunks, [probe], ctx)
    moved = [k for k in snapshot if not torch.equal(live[k], snapshot[k])]
    f.figures["tensors_changed_by_forward_after_save"] = len(moved)
    if moved:
        f.fail(f"the forward after the save changed {len(moved)} weight tensor(s) (e.g. "
               f"{moved[0]}): the saved weights were not the gathered ones")

    fresh = build(env, preset, bf16=True, use_te=None)
    load_model_weights(fresh, root / "weights")
    loaded = keyed_tensors(fresh)
    differ = [k for k in live if k not in loaded or not torch.equal(loaded[k], live[k])]
    f.figures["tensors_compared_with_checkpoint"] = len(live)
    f.figures["tensors_differing_from_checkpoint"] = len(differ)
    if differ:
        f.fail(f"{len(differ)} saved tensor(s) differ from the live weights (e.g. {differ[0]})")
    f.compare("rewards_reloaded_vs_live", score_packed(fresh, [probe], ctx), r_live, 1e-6)
    f.headline_parts.append(f"DP={ctx.dp_size}, {checked} main-param elements, "
                            f"{len(live)} tensors saved == live: {'no' if differ else 'yes'}")
    del chunks, fresh, optimizer
    if env.world > 1:
        torch.distributed.barrier()  # every rank has read the checkpoint
    if env.rank == 0:
        shutil.rmtree(root, ignore_errors=True)


# -- e2. TP communication overlap (TE userbuffers) ---------------------------------------------

def check_tp_comm_overlap(env: CheckEnv, f: Findings) -> None:
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.schedules import score_packed
    from megatron_polar.training.step import (build_optimizer, destroy_userbuffers,
                                              initialize_userbuffers, train_step)

    ctx, tp = env.ctx, env.ctx.tp_size
    missing = [what for what, ok in (
        ("a CUDA GPU", env.on_gpu), ("Transformer Engine", env.te),
        (f"TP >= 2 (this run: TP={tp}, world size {env.world}; start it with "
         "--tensor-model-parallel-size 2)", tp >= 2)) if not ok]
    if missing:
        raise SkipCheck("needs TE, CUDA and torchrun with >= 2 GPUs, e.g. `torchrun "
                        "--nproc-per-node 8 tools/gpu_check.py --tensor-model-parallel-size 2 "
                        f"--checks tp_comm_overlap`; missing: {', '.join(missing)}")
    preset = env.check_preset
    # One activation shape for every pack, as the trainer pads every pack to
    # --micro-batch-tokens under --tp-comm-overlap: the userbuffers are sized for it and TE's
    # overlapped GEMMs take exactly that many tokens. Sequence parallelism splits them over TP.
    tokens = env.pack_len
    if tokens % tp:
        raise SkipCheck(f"the pack of {tokens} tokens does not split over TP={tp} (sequence "
                        "parallelism)")
    # Megatron overlaps the sequence-parallel all-gather / reduce-scatter with the GEMMs, so
    # tp_comm_overlap needs sequence_parallel (ModelRunConfig refuses it without, as
    # Megatron-LM's arguments.py does); TP is this run's (the parallel state the tool set up).
    layout = dict(tensor_model_parallel_size=tp, sequence_parallel=True)
    initialize_userbuffers(tokens, preset.hidden_size, tp, fp8=False, bf16=True)
    try:
        reference = build(env, preset, bf16=True, use_te=True, tp_comm_overlap=False, **layout)
        overlapped = build(env, preset, bf16=True, use_te=True, tp_comm_overlap=True, **layout)
        f.figures.update(tensor_parallel=tp, data_parallel=ctx.dp_size, tokens=tokens,
                         tensors_copied=copy_weights(reference, overlapped))
        # Every TP rank of a DP replica takes the same pack; lr 0 keeps the copied weights.
        pack = env.pack(env.pairs(8 + ctx.dp_rank))
        optimizer_config = OptimizerConfig(optimizer="adam", lr=0.0, bf16=True,
                                           params_dtype=torch.bfloat16, clip_grad=1.0)
        results = {}
        for name, chunks in (("no_overlap", reference), ("overlap", overlapped)):
            optimizer = build_optimizer(chunks, optimizer_config, ctx)
            step = train_step(chunks, optimizer, [pack], ctx)
            results[name] = (step, score_packed(chunks, [pack], ctx))
            del optimizer
        (ref_step, ref_rewards), (ovl_step, ovl_rewards) = results["no_overlap"], \
            results["overlap"]
        loss_ref, loss_ovl = ref_step.metrics.loss, ovl_step.metrics.loss
        if env.injected("tp_comm_overlap"):
            loss_ovl *= 2.0
        for what, got, ref, tol in (("loss", loss_ovl, loss_ref, env.tol("bf16")),
                                    ("grad_norm", ovl_step.grad_norm, ref_step.grad_norm,
                                     env.tol("bf16_grad"))):
            err = abs(got - ref) / max(abs(ref), 1e-30)
            f.figures[what] = {"no_overlap": ref, "overlap": got, "rel_err": err, "tol": tol}
            if not err <= tol:
                f.fail(f"{what}: with overlap {got:.5g} vs without {ref:.5g}, relative "
                       f"{err:.3g} > {tol:.3g}")
        f.headline_parts.append(f"TP={tp}, loss {loss_ref:.4f} vs {loss_ovl:.4f}")
        if ref_rewards is not None:  # the last pipeline stage (PP is 1 here)
            f.compare("rewards", ovl_rewards, ref_rewards, env.tol("bf16"), headline=True)
        if not (ref_step.update_successful and ovl_step.update_successful):
            f.fail("a step was skipped (non-finite loss or gradient norm)")
        del reference, overlapped
    finally:
        free_memory()
        destroy_userbuffers()


# -- g. throughput -----------------------------------------------------------------------------

def synthetic_pack(g: torch.Generator, preset, budget: int):
    """One pack of whole random pairs filling `budget` tokens, padded to exactly `budget`.
    Length mix of tools/benchmark_step.py (megatron_polar/testing/step_benchmark.py): prompt
    uniform in 1..budget/16, reference and candidates uniform in 1..budget/8, each sequence
    [prompt, reference, prompt, response] plus 3 special tokens."""
    from megatron_polar.data.packing import build_packed_micro_batch

    def draw(hi):
        return int(torch.randint(1, max(1, hi) + 1, (1,), generator=g))

    def seq(n):
        ids = torch.randint(3, preset.vocab_size - 1, (n - 1,), generator=g).tolist()
        return ids + [preset.reward_token_id]

    pairs, used, misses = [], 0, 0
    while misses < 16:
        p = draw(budget // 16)
        ref, pos, neg = (draw(budget // 8) for _ in range(3))
        n_pos, n_neg = 2 * p + ref + pos + 3, 2 * p + ref + neg + 3
        if used + n_pos + n_neg > budget:
            misses += 1
            continue
        pairs.append((seq(n_pos), seq(n_neg)))
        used += n_pos + n_neg
    return build_packed_micro_batch(pairs, budget, preset.pad_token_id)


def check_throughput(env: CheckEnv, f: Findings) -> None:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.chunks import unwrap
    from megatron_polar.training.flops import peak_tflops_of_this_gpu, training_flops
    from megatron_polar.training.step import build_optimizer, train_step

    args, ctx, preset = env.args, env.ctx, env.preset
    bf16 = env.on_gpu  # bf16 is the training precision; a CPU runs it slowly (no bf16 GEMMs)
    budget = args.throughput_tokens or (16384 if env.on_gpu else 512)
    n_micro, warmup, timed = args.throughput_micro_batches, args.warmup_steps, args.steps
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                        overlap_grad_reduce=True, overlap_param_gather=True)
    chunks = build(env, preset, bf16=bf16, use_te=None, ddp=ddp)  # TE when it imports on CUDA
    optimizer = build_optimizer(chunks, OptimizerConfig(
        optimizer="adam", lr=1e-5, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, clip_grad=1.0,
        use_distributed_optimizer=True), ctx)
    g = torch.Generator().manual_seed(args.seed + 1000 + ctx.dp_rank)
    batches = [[synthetic_pack(g, preset, budget) for _ in range(n_micro)]
               for _ in range(warmup + timed)]
    seconds = tokens = flops = computed = 0.0
    losses, skipped = [], 0
    for i, micro_batches in enumerate(batches):
        _synchronize(env)
        t0 = time.perf_counter()
        result = train_step(chunks, optimizer, micro_batches, ctx,
                            poison_loss=env.injected("throughput"))
        _synchronize(env)
        if i < warmup:
            continue
        seconds += time.perf_counter() - t0
        losses.append(result.metrics.loss)
        skipped += not result.update_successful
        tokens += sum(mb.num_tokens for mb in micro_batches)
        computed += sum(mb.tokens.shape[1] for mb in micro_batches)
        for mb in micro_batches:
            lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist()
            flops += training_flops(preset, lengths)
    sums = torch.tensor([tokens, flops, computed], dtype=torch.float64, device=env.device)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=env.device)
    if env.world > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    tokens, flops, computed = sums.tolist()
    seconds = float(slowest)
    tflops_per_gpu = flops / seconds / env.world / 1e12
    peak = args.peak_tflops or peak_tflops_of_this_gpu()
    mfu = tflops_per_gpu / peak if peak else None
    params = sum(p.numel() for p in unwrap(chunks[0]).parameters())
    f.figures.update(
        preset=preset.name, parameters=params, spec="te" if env.te else "local",
        precision="bf16" if bf16 else "fp32", tensor_parallel=1, data_parallel=ctx.dp_size,
        distributed_optimizer=True, micro_batch_tokens=budget, micro_batches_per_step=n_micro,
        warmup_steps=warmup, timed_steps=timed, step_seconds=seconds / timed,
        tokens_per_s=tokens / seconds, tokens_per_s_per_gpu=tokens / seconds / env.world,
        packing_real_per_computed=tokens / computed if computed else None,
        tflops_per_gpu=tflops_per_gpu, peak_tflops=peak, mfu=mfu, losses=losses)
    mfu_text = f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a (unknown peak)"
    f.headline_parts.append(f"{tokens / seconds / env.world:,.0f} tokens/s/GPU, "
                            f"{tflops_per_gpu:.3g} TFLOP/s/GPU, {mfu_text}")
    if skipped or not all(math.isfinite(x) for x in losses):
        f.fail(f"{skipped} of {timed} timed steps skipped their update (non-finite loss or "
               "gradient norm)")
    if args.min_mfu is not None and (mfu is None or mfu < args.min_mfu):
        f.fail(f"MFU {mfu} below --min-mfu {args.min_mfu}")
    del chunks, optimizer


def _synchronize(env: CheckEnv) -> None:
    if env.on_gpu:
        torch.cuda.synchronize()


# -- f. peak memory (from the others' figures) -------------------------------------------------

def check_peak_memory(env: CheckEnv, f: Findings, results: list) -> None:
    if not env.on_gpu:
        raise SkipCheck("torch.cuda memory statistics need a CUDA GPU")
    # torch.cuda.max_memory_allocated / max_memory_reserved since reset_peak_memory_stats at
    # the start of each item (run_item): tensors the caching allocator handed out, and what
    # it held from the driver (allocated plus its cache and fragmentation).
    per_item = {r.name: r.peak_memory_gib for r in results if r.peak_memory_gib is not None}
    reserved = {r.name: r.peak_reserved_gib for r in results if r.peak_reserved_gib is not None}
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    overall = max(per_item.values(), default=0.0)
    f.figures.update(per_item_allocated_gib=per_item, per_item_reserved_gib=reserved,
                     overall_peak_gib=overall,
                     overall_reserved_gib=max(reserved.values(), default=0.0),
                     device_memory_gib=round(total, 2),
                     overall_fraction_of_device=overall / total)
    f.headline_parts.append(f"overall {overall:.1f} GiB of {total:.0f} GiB"
                            + (f" ({max(per_item, key=per_item.get)})" if per_item else ""))


# -- runner ------------------------------------------------------------------------------------

CHECKS: dict[str, Callable] = {
    "te_parity": check_te_parity,
    "packed_vs_unpacked": check_packed_vs_unpacked,
    "flex_attention": check_flex_attention,
    "fp8_step": check_fp8_step,
    "checkpoint_after_overlap": check_checkpoint_after_overlap,
    "tp_comm_overlap": check_tp_comm_overlap,
    "throughput": check_throughput,
}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_item(env: CheckEnv, name: str, results: list) -> ItemResult:
    findings = Findings()
    free_memory()
    if env.on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    status, reason = "pass", None
    try:
        if env.ctx.tp_size > 1 and name not in ITEMS_AT_TP:
            raise SkipCheck(f"runs at TP=1; this run has --tensor-model-parallel-size "
                            f"{env.ctx.tp_size} (for {', '.join(ITEMS_AT_TP[:-1])})")
        if name == "peak_memory":
            check_peak_memory(env, findings, results)
        else:
            CHECKS[name](env, findings)
        if findings.failures:
            status, reason = "fail", "; ".join(findings.failures)
    except SkipCheck as e:
        status, reason = "skip", str(e)
    except Exception as e:  # an item that crashes fails; the others still run
        status, reason = "fail", f"{type(e).__name__}: {e}"
        findings.figures["traceback"] = traceback.format_exc().splitlines()[-12:]
    if env.on_gpu:
        torch.cuda.synchronize()
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if env.on_gpu else None
    reserved = round(torch.cuda.max_memory_reserved() / 2**30, 3) if env.on_gpu else None
    seconds = time.perf_counter() - start
    free_memory()
    headline = "; ".join(findings.headline_parts) or (reason or "")
    return ItemResult(name, status, reason, headline, _jsonable(findings.figures), seconds,
                      peak, reserved)


def merge_ranks(per_rank: list[dict]) -> dict:
    """One item from every rank's: failed if any rank failed, the worst peak memory."""
    merged = dict(per_rank[0])
    failed = [i for i, r in enumerate(per_rank) if r["status"] == "fail"]
    merged["failed_ranks"] = failed
    if failed and merged["status"] != "fail":
        merged["status"] = "fail"
        merged["reason"] = f"rank {failed[0]}: {per_rank[failed[0]]['reason']}"
    for key in ("peak_memory_gib", "peak_reserved_gib"):
        peaks = [r[key] for r in per_rank if r[key] is not None]
        merged[key] = max(peaks) if peaks else None
    return merged


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def exit_code(report: dict) -> int:
    return 1 if any(item["status"] == "fail" for item in report["items"]) else 0


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [f"gpu-check on {env['device']}"
             + (f" (sm{''.join(map(str, env['capability']))})" if env.get("capability") else "")
             + f", {report['world_size']} rank(s); torch {env['torch']}, Transformer Engine "
             f"{env['transformer_engine'] or 'not installed'}, megatron-core "
             f"{env['megatron_core']}",
             f"{'item':<26} {'status':<6} {'seconds':>8} {'peak GiB':>9}  figures / reason"]
    for item in report["items"]:
        peak = f"{item['peak_memory_gib']:.2f}" if item["peak_memory_gib"] is not None else "-"
        note = item["headline"] if item["status"] == "pass" else (item["reason"] or "")
        if item["status"] == "fail" and item["failed_ranks"]:
            note = f"[ranks {item['failed_ranks']}] {note}"
        lines.append(f"{item['name']:<26} {item['status']:<6} {item['seconds']:>8.1f} "
                     f"{peak:>9}  {note}")
    s = report["summary"]
    lines.append(f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped in "
                 f"{report['seconds']:.0f} s; report: {report['report_path']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="What to run first on a new GPU node: correctness of the GPU paths "
                    "(TE vs local spec, packing, flex attention, FP8, checkpoint after "
                    "overlapped steps), peak memory and training throughput / MFU.")
    p.add_argument("--report", default="gpu_check_report.json", help="JSON report path")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run what can run on a CPU (gloo) instead of refusing; for tests")
    p.add_argument("--model-preset", default="internlm2_5-1_8b",
                   help="preset for the throughput item; the correctness items use its widths")
    p.add_argument("--check-layers", type=int, default=4,
                   help="layers of the preset for the correctness items (0: all)")
    p.add_argument("--checks", default=",".join(ITEMS),
                   help=f"comma-separated subset of: {', '.join(ITEMS)}")
    p.add_argument("--throughput-tokens", type=int, default=None,
                   help="tokens per packed micro-batch (default 16384 on a GPU, 512 on CPU)")
    p.add_argument("--throughput-micro-batches", type=int, default=2,
                   help="micro-batches per rank and step")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed throughput steps")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak for MFU (default: from the GPU name, flops.py)")
    p.add_argument("--min-mfu", type=float, default=None,
                   help="fail the throughput item below this MFU (a fraction, e.g. 0.3)")
    p.add_argument("--fp8-format", default="hybrid", choices=("hybrid", "e4m3"))
    p.add_argument("--fp8-recipe", default="delayed",
                   choices=("delayed", "tensorwise", "blockwise", "mxfp8"))
    p.add_argument("--fp8-steps", type=int, default=3,
                   help="FP8 and bf16 steps on the same batch; the last one is compared")
    p.add_argument("--checkpoint-steps", type=int, default=2)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP of the run (default 1); > 1 runs only tp_comm_overlap (and "
                        "peak_memory), at that TP with sequence parallelism; the world size "
                        "must be a multiple")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance (the defaults are in gpu_check.py TOL)")
    p.add_argument("--work-dir", default=None,
                   help="scratch directory for the checkpoint item (default: a temporary one; "
                        "give a shared path when ranks span nodes)")
    p.add_argument("--timeout-minutes", type=int, default=10,
                   help="collective timeout, so a rank that fails mid-item cannot hang the job")
    p.add_argument("--seed", type=int, default=1234)
    # Tests: make one item's comparison see a wrong value, to prove it fails.
    p.add_argument("--inject-fault", default=None, choices=ITEMS, help=argparse.SUPPRESS)
    return p


def _shared_workdir(args, rank: int, world: int) -> tuple[Path, bool]:
    made = False
    path = args.work_dir
    if path is None and rank == 0:
        path, made = tempfile.mkdtemp(prefix="gpu_check_"), True
    if world > 1:
        box = [path]
        torch.distributed.broadcast_object_list(box, src=0)
        path = box[0]
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path), made


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    selected = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in selected if c not in ITEMS]
    if unknown:
        build_parser().error(f"unknown check(s) {unknown}; known: {', '.join(ITEMS)}")
    tp, world_size = args.tensor_model_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world_size % tp:
        build_parser().error(f"--tensor-model-parallel-size {tp} must be >= 1 and divide the "
                             f"world size {world_size}")
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2

    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import get_preset
    from megatron_polar.model.spec import transformer_engine_available
    from megatron_polar.runtime.parallel import initialize_parallel

    started = time.perf_counter()
    ctx = initialize_parallel(
        ModelRunConfig(seed=args.seed, tensor_model_parallel_size=args.tensor_model_parallel_size),
        timeout_minutes=args.timeout_minutes)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    preset = get_preset(args.model_preset)
    layers = args.check_layers if 0 < args.check_layers < preset.num_layers else preset.num_layers
    check_preset = preset if layers == preset.num_layers else \
        preset.replace(name=f"{preset.name}-{layers}l", num_layers=layers)
    workdir, made = _shared_workdir(args, rank, world)
    env = CheckEnv(args=args, ctx=ctx, preset=preset, check_preset=check_preset, on_gpu=on_gpu,
                   te=on_gpu and transformer_engine_available(),
                   capability=tuple(torch.cuda.get_device_capability()) if on_gpu else None,
                   tf32=tf32_enabled(), rank=rank, world=world, workdir=workdir,
                   tolerance_scale=args.tolerance_scale)

    results: list[ItemResult] = []
    # peak_memory reads the others' figures, so it runs last; the report keeps ITEMS' order.
    order = [n for n in ITEMS if n in selected and n != "peak_memory"] \
        + (["peak_memory"] if "peak_memory" in selected else [])
    for name in order:
        result = run_item(env, name, results)
        results.append(result)
        if rank == 0:
            print(f"[gpu-check] {name}: {result.status} ({result.seconds:.1f} s)"
                  + (f": {result.reason}" if result.status != "pass" and result.reason else ""),
                  flush=True)
    items = [r.as_dict() for r in sorted(results, key=lambda r: ITEMS.index(r.name))]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, items)
        items = [merge_ranks([g[i] for g in gathered]) for i in range(len(items))]

    code = 1 if any(i["status"] == "fail" for i in items) else 0
    if rank == 0:
        report = {
            "tool": "gpu_check", "format": 1,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "environment": environment_info(env),
            "world_size": world, "data_parallel_size": ctx.dp_size,
            "tensor_model_parallel_size": ctx.tp_size,
            "model_preset": preset.name,
            "check_preset": {"name": check_preset.name, "num_layers": check_preset.num_layers},
            "tolerances": {**TOL, "scale": args.tolerance_scale,
                           "per_param_factor": PER_PARAM_FACTOR, "flex_ratio": FLEX_RATIO,
                           "flex_floor": FLEX_FLOOR},
            "items": items,
            "summary": {s: sum(i["status"] == k for i in items)
                        for s, k in (("passed", "pass"), ("failed", "fail"),
                                     ("skipped", "skip"))},
            "ok": code == 0,
            "seconds": round(time.perf_counter() - started, 1),
            "report_path": str(args.report),
        }
        report = _jsonable(report)
        path = Path(args.report)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(format_table(report), flush=True)
    if made and rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()
    return code
