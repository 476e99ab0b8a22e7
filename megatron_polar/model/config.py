"""How a preset is run: precision, FP8, parallel sizes -> a megatron-core `TransformerConfig`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_polar.config.flags import option
from megatron_polar.model.presets import ModelPreset

log = logging.getLogger(__name__)

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
# --transformer-impl: the layer spec (None: TE when it imports and CUDA is up)
TRANSFORMER_IMPLS = {"auto": None, "transformer_engine": True, "local": False}


@dataclass
class FP8Config:
    """FP8 through Transformer Engine (Hopper or newer). `format=None` means no FP8."""

    format: Optional[str] = option(
        None, choices=FP8_FORMATS,
        help="FP8 through Transformer Engine (Hopper GPUs only): hybrid (e4m3 forward, e5m2 "
             "backward) or e4m3")
    recipe: str = option("delayed", help=f"one of {', '.join(FP8_RECIPES)}")
    margin: int = option(0, help="FP8 scaling margin (powers of 2 of headroom)")
    amax_history_len: int = option(1024, help="steps of amax history for delayed scaling")
    amax_compute_algo: str = option("max", choices=("max", "most_recent"),
                                    help="scale from the history's max or its latest amax")

    def __post_init__(self):
        if self.format is not None and self.format not in FP8_FORMATS:
            raise ValueError(f"fp8 format must be one of {FP8_FORMATS}, got {self.format!r}")
        if self.recipe not in FP8_RECIPES:
            raise ValueError(f"fp8 recipe must be one of {FP8_RECIPES}, got {self.recipe!r}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError("fp8 amax_compute_algo must be 'max' or 'most_recent'")
        if self.amax_history_len < 1:
            raise ValueError("fp8 amax_history_len must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.format is not None


@dataclass
class ModelRunConfig:
    """Everything about running a preset that is not its architecture. Each field is a flag of
    every tool that runs a model (`add_model_args`: `--tensor-model-parallel-size`, `--bf16`,
    `--fp8-format`, ...), generated from the field."""

    tensor_model_parallel_size: int = option(1, help="tensor (intra-layer) parallel size")
    pipeline_model_parallel_size: int = option(1, help="pipeline (inter-layer) parallel size")
    # From --num-layers-per-virtual-pipeline-stage, which needs the preset's layer count
    # (training/arguments.py, `run_config_from_args`).
    virtual_pipeline_model_parallel_size: Optional[int] = option(None, cli=False)
    context_parallel_size: int = option(
        1, help="split sequences across ranks (Transformer Engine only)")  # > 1 is refused
    sequence_parallel: bool = option(
        False, help="split norms and dropout activations along the sequence over TP ranks")
    tp_comm_overlap: bool = option(
        False, help="overlap TP communication with GEMMs (Transformer Engine userbuffers)")
    recompute_granularity: Optional[str] = option(
        None, choices=("selective", "full"),
        help="activation recomputation: core attention only (selective) or whole layers")
    recompute_method: Optional[str] = option(
        None, choices=("uniform", "block"), help="with full: how layers are grouped")
    recompute_num_layers: Optional[int] = option(None, help="with full: layers per group")
    bf16: bool = option(False, help="bf16 parameters and compute")
    fp8: FP8Config = option(default_factory=FP8Config)
    use_transformer_engine: Optional[bool] = option(
        None, flag="--transformer-impl", choices=TRANSFORMER_IMPLS,
        help="layer spec; auto = TE when it imports and CUDA is up")
    init_method_std: float = option(0.02, cli=False)
    seed: int = option(1234, help="random seed (initialisation, data order)")

    def __post_init__(self):
        if min(self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
               self.context_parallel_size) < 1:
            raise ValueError("parallel sizes must be >= 1")
        if self.tp_comm_overlap and not self.sequence_parallel:
            raise ValueError("--tp-comm-overlap needs --sequence-parallel (megatron overlaps the "
                             "sequence-parallel all-gather/reduce-scatter with the GEMMs)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"recompute_granularity must be selective or full, "
                             f"got {self.recompute_granularity!r}")


def wgrad_fusion_kernel_available() -> bool:
    """Whether apex's `fused_weight_gradient_mlp_cuda` imports, exactly as megatron-core checks
    it (megatron/core/tensor_parallel/layers.py:44-48, `_grad_accum_fusion_available`)."""
    try:
        from megatron.core.tensor_parallel import layers
    except Exception:
        return False
    return bool(getattr(layers, "_grad_accum_fusion_available", False))


_logged_wgrad_fusion_off = False


def use_gradient_accumulation_fusion(use_te: bool, on_gpu: bool,
                                     kernel_available: Optional[bool] = None) -> bool:
    """megatron's fused weight-gradient accumulation (wgrad GEMM straight into the fp32
    `main_grad`). TE's linear layers fuse it themselves (`fuse_wgrad_accumulation`,
    megatron/core/extensions/transformer_engine.py:626), but megatron-core's own
    ColumnParallelLinear refuses the setting at construction unless apex's
    `fused_weight_gradient_mlp_cuda` imports (tensor_parallel/layers.py:924-933), and its
    backward calls that kernel (layers.py:561-575, RowParallelLinear too). The fusion is on
    only with TE on a GPU *and* the apex kernel; otherwise off, said once. (With the TE spec
    and the LM head never built, no megatron linear is left that would need apex; TE's own
    fusion would do. Kept conservative until a GPU run shows otherwise.)"""
    global _logged_wgrad_fusion_off
    if not (use_te and on_gpu):
        return False
    available = wgrad_fusion_kernel_available() if kernel_available is None else kernel_available
    if not available and not _logged_wgrad_fusion_off:
        _logged_wgrad_fusion_off = True
        log.warning("gradient accumulation fusion off: apex's fused_weight_gradient_mlp_cuda "
                    "kernel does not import (install apex with --cpp_ext --cuda_ext to fuse "
                    "weight-gradient accumulation)")
    return available


def build_transformer_config(preset: ModelPreset, run: ModelRunConfig,
                             use_te: bool) -> TransformerConfig:
    """The megatron-core config for `preset`: RMSNorm, SwiGLU (gate then up in linear_fc1),
    RoPE, GQA, no biases, no dropout. `use_te` is the resolved layer-spec choice."""
    on_gpu = torch.cuda.is_available()
    fp8 = run.fp8
    fp8_kwargs = {}
    if fp8.enabled:
        fp8_kwargs = dict(fp8=fp8.format, fp8_recipe=fp8.recipe, fp8_margin=fp8.margin,
                          fp8_amax_history_len=fp8.amax_history_len,
                          fp8_amax_compute_algo=fp8.amax_compute_algo)
    return TransformerConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups,
        ffn_hidden_size=preset.ffn_hidden_size,
        kv_channels=preset.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=preset.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=run.init_method_std,
        tensor_model_parallel_size=run.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.virtual_pipeline_model_parallel_size,
        context_parallel_size=run.context_parallel_size,
        sequence_parallel=run.sequence_parallel,
        tp_comm_overlap=run.tp_comm_overlap,
        # Packs have their own lengths (no padding to the budget), so pipeline stages send each
        # activation's shape before it. Not under the interleaved schedule: megatron exchanges
        # shapes with one batched send/recv per call in a fixed order (pipeline_parallel/
        # p2p_communication.py:165-251), whatever `batch_p2p_comm` says. At PP=2 next and
        # previous stage are one rank, so a call sending an activation and a gradient
        # (send_forward_backward_recv_forward_backward, schedules.py:1482, 1762) hands the
        # peer the gradient's shape as the activation's ("Received data size doesn't match" on
        # gloo when lengths differ); and with equal lengths at M = PP (PP=2, VPP=2, gloo) the
        # first stage, all warm-up, and the last, in 1F1B, wait on each other's shape and
        # data messages forever. With virtual stages every micro-batch of a step has one length
        # instead (PackingSampler(uniform_length_per_step=True)); the schedule builds its
        # tensor shape from the step's `seq_length` (schedules.py:1019-1022).
        variable_seq_lengths=(run.pipeline_model_parallel_size > 1
                              and not run.virtual_pipeline_model_parallel_size),
        # Dense model, no MoE; megatron validates the (unused) dispatcher against the setting
        # above and only the all-to-all one accepts variable lengths.
        moe_token_dispatcher_type="alltoall",
        bf16=run.bf16,
        params_dtype=torch.bfloat16 if run.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if run.bf16 else torch.float32,
        # The reward head reads one token per sequence; the loss is per pair, normalised by
        # the global pair count (megatron's per-token path with pairs as "tokens").
        calculate_per_token_loss=True,
        recompute_granularity=run.recompute_granularity,
        recompute_method=run.recompute_method,
        recompute_num_layers=run.recompute_num_layers,
        # Fused kernels come from TE/apex on GPU; the CPU path uses plain torch ops.
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=use_gradient_accumulation_fusion(use_te, on_gpu),
        bias_activation_fusion=use_te and on_gpu,
        masked_softmax_fusion=False,
        # Unfused RoPE: shared-prefix packs give one frequency row per token (candidates
        # continue their prefix's positions), which only megatron's unfused THD path takes
        # (rope_utils.py 0.16.1, lines 206-225); TE's fused THD kernel restarts every packed
        # sequence at position 0. RoPE is a few elementwise ops per layer.
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # gloo matches point-to-point messages between two ranks in posting order; a batched
        # send/recv of an activation and a gradient of one shape can pair up crosswise under the
        # interleaved schedule. Megatron's unbatched even/odd ordering is exact on gloo.
        # NCCL matches sends and receives to one peer in posting order too: at PP=2 with
        # virtual stages, next and previous stage are the same rank, and the batched order
        # (send_prev, recv_prev, send_next, recv_next; pipeline_parallel/p2p_communication.py:
        # 16-51) pairs an activation with a gradient (Megatron-LM issues #750, #1450). The
        # unbatched path uses a second group for one direction at PP=2 (p2p_communication.py:66).
        batch_p2p_comm=on_gpu and not (run.pipeline_model_parallel_size == 2
                                       and run.virtual_pipeline_model_parallel_size),
        **fp8_kwargs,
    )
