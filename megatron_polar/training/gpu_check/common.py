"""What every item shares: the item names and titles, the tolerances (with their reasoning),
and the result types (`Findings` while an item runs, `ItemResult` after)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

ITEMS = ("te_parity", "packed_vs_unpacked", "flex_attention", "shared_prefix", "fp8_step",
         "checkpoint_after_overlap", "tp_comm_overlap", "peak_memory", "throughput")
# The items that run when the tool was started at TP > 1; the others assume TP=1 and skip there.
ITEMS_AT_TP = ("tp_comm_overlap", "peak_memory")
TITLES = {
    "te_parity": "local spec vs Transformer Engine spec (same weights)",
    "packed_vs_unpacked": "packed THD micro-batch vs each sequence alone",
    "flex_attention": "flex_attention document mask vs per-sequence attention",
    "shared_prefix": "shared-prefix packs (prefix once) vs plain packs of whole sequences",
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
