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
  shared_prefix             shared-prefix packs (each pair's and a ranked list's common prefix
                            once) vs whole-sequence packs: rewards and loss gradients, local
                            spec fp32/bf16 and TE bf16 (the TE shared-prefix attention's first run)
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

Modules (each item is a function `check_<item>(env, findings)` raising SkipCheck with its
reason, or recording its figures and failures in `findings`):

  common.py       item names and titles, tolerances (TOL, with the reasoning), SkipCheck,
                  Findings, ItemResult
  env.py          CheckEnv: flags, parallel state, presets, what this machine has, the
                  correctness items' sequences; free_memory
  models.py       build (the trainer's builder; items call `models.build`, so a test can
                  replace it there), weights by checkpoint key, pair-loss gradients
  parity.py       te_parity, packed_vs_unpacked, flex_attention
  fp8_overlap.py  fp8_step, tp_comm_overlap (Transformer Engine only)
  checkpoint.py   checkpoint_after_overlap
  throughput.py   throughput, peak_memory
  report.py       environment, ranks merged, the JSON report, the table, the exit status
  runner.py       the flags, run_item, main (tools/gpu_check.py; `python -m
                  megatron_polar.training.gpu_check`, `__main__.py`)

Written against megatron-core 0.16.1; GPU-only calls cite the upstream lines they rely on.
"""

from megatron_polar.training.gpu_check import models
from megatron_polar.training.gpu_check.checkpoint import check_checkpoint_after_overlap
from megatron_polar.training.gpu_check.common import (FLEX_FLOOR, FLEX_RATIO, ITEMS, ITEMS_AT_TP,
                                                      NO_GPU_MESSAGE, PER_PARAM_FACTOR, TITLES,
                                                      TOL, Findings, ItemResult, SkipCheck,
                                                      rel_err)
from megatron_polar.training.gpu_check.env import CheckEnv, free_memory, tf32_enabled
from megatron_polar.training.gpu_check.fp8_overlap import check_fp8_step, check_tp_comm_overlap
from megatron_polar.training.gpu_check.models import (build, compare_gradients, copy_weights,
                                                      keyed_tensors, loss_gradients, sequences)
from megatron_polar.training.gpu_check.parity import (check_flex_attention,
                                                      check_packed_vs_unpacked, check_te_parity)
from megatron_polar.training.gpu_check.report import (build_report, environment_info, exit_code,
                                                      format_table, jsonable, merge_ranks,
                                                      write_report)
from megatron_polar.training.gpu_check.runner import CHECKS, build_parser, main, run_item
from megatron_polar.training.gpu_check.throughput import (check_peak_memory, check_throughput,
                                                          synthetic_pack)

__all__ = [
    "CHECKS", "FLEX_FLOOR", "FLEX_RATIO", "ITEMS", "ITEMS_AT_TP", "NO_GPU_MESSAGE",
    "PER_PARAM_FACTOR", "TITLES", "TOL", "CheckEnv", "Findings", "ItemResult", "SkipCheck",
    "build", "build_parser", "build_report", "check_checkpoint_after_overlap",
    "check_flex_attention", "check_fp8_step", "check_packed_vs_unpacked", "check_peak_memory",
    "check_te_parity", "check_throughput", "check_tp_comm_overlap", "compare_gradients",
    "copy_weights", "environment_info", "exit_code", "format_table", "free_memory", "jsonable",
    "keyed_tensors", "loss_gradients", "main", "merge_ranks", "models", "rel_err", "run_item",
    "sequences", "synthetic_pack", "tf32_enabled", "write_report",
]
