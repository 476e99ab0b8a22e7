"""`CheckEnv`, what every item is given: the flags, the parallel state, the presets, what this
machine has (CUDA, Transformer Engine, TF32), and the sequences the correctness items share."""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_polar.training.gpu_check.common import TOL


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


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
