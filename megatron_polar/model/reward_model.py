"""The POLAR reward model: megatron-core's GPTModel with a scalar head instead of the LM head.

The decoder (embeddings, layers, final RMSNorm, RoPE) is megatron's GPTModel unchanged. On the
last pipeline stage the vocab projection (`output_layer`) is replaced by `RewardHead`, a
hidden -> 1 linear kept in fp32. GPTModel's own forward then returns per-token scores
[b, s, 1]; the reward of a sequence is the score at its last token (the reward token), which
`rewards_at` picks out. Per-token scores are what a value model needs too.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_polar.model.presets import ModelPreset
from megatron_polar.model.shared_prefix import SharedPrefixParams


class RewardHead(MegatronModule):
    """Linear hidden -> 1 without bias (released checkpoints call it `v_head`), computed in fp32.

    The weight is stored in the model's dtype like every other parameter (bf16 in a bf16 run;
    the optimizer keeps its fp32 master copy, as for all weights). An fp32 parameter inside a
    bf16 model breaks megatron's distributed optimizer: each parameter group is laid out
    fp32-first (megatron/core/optimizer/distrib_optimizer.py 0.16.1, lines 439-447) while its
    index map keeps model order (lines 288-297), so checkpointing looked optimizer state up
    for the wrong parameter. The released POLAR trains `v_head` in bf16 too.

    One output cannot be split over tensor-parallel ranks, so the weight is replicated. Under
    sequence parallelism each TP rank scores its own slice of the sequence and only the
    [s, b, 1] scores are gathered (not the [s, b, h] hidden states); the weight's gradient is
    then partial per rank and megatron sums it over TP for parameters marked
    `sequence_parallel` (distributed/finalize_model_grads.py 0.16.1, line 354).
    """

    def __init__(self, config: TransformerConfig, tp_group, zero_init: bool = False):
        super().__init__(config=config)
        # As megatron-core's own layers allocate (tensor_parallel/layers.py 0.16.1,
        # ColumnParallelLinear: `use_cpu_initialization` else `torch.cuda.current_device()`).
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(1, config.hidden_size, dtype=config.params_dtype, device=device))
        if zero_init:
            torch.nn.init.zeros_(self.weight)
        elif config.perform_initialization:
            # Drawn in fp32 and rounded, so a bf16 run starts from the fp32 run's head.
            with torch.no_grad():
                self.weight.copy_(torch.empty(1, config.hidden_size, dtype=torch.float32,
                                              device=device).normal_(0.0, config.init_method_std))
        self.tp_group = tp_group
        self.sequence_parallel = config.sequence_parallel
        if self.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        """[s(/tp), b, h] -> ([s, b, 1] fp32 scores, None); signature of megatron's output layer."""
        scores = F.linear(hidden_states.float(), self.weight.float())
        if self.sequence_parallel:
            # Downstream is replicated, so the backward must split, not reduce-scatter.
            scores = gather_from_sequence_parallel_region(
                scores, tensor_parallel_output_grad=False, group=self.tp_group)
        return scores, None


class PolarRewardModel(GPTModel):
    """InternLM2-style decoder + `RewardHead`. Forward returns per-token scores [b, s, 1] on the
    last pipeline stage and hidden states on the others, as GPTModel does."""

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        preset: ModelPreset,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
        pg_collection=None,
        zero_init_head: bool = False,
    ):
        with _reward_head_as_output_layer(zero_init_head):
            super().__init__(
                config=config,
                transformer_layer_spec=_with_final_norm(transformer_layer_spec, config,
                                                        vp_stage, pg_collection),
                vocab_size=preset.vocab_size,
                max_sequence_length=preset.max_position_embeddings,
                pre_process=pre_process,
                post_process=post_process,
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_base=preset.rotary_base,
                pg_collection=pg_collection,
                vp_stage=vp_stage,
            )
        self.preset = preset
        if post_process and not isinstance(self.output_layer, RewardHead):
            # A megatron-core that builds its output layer some other way: replace it (the
            # vocab-sized projection was allocated once, and is freed here).
            self.output_layer = RewardHead(config, self.pg_collection.tp, zero_init=zero_init_head)
        if post_process:
            # setup_embeddings_and_output_layer tagged it as the LM head; it is not one (the tag
            # selects megatron's decoupled embedding/output learning rate).
            self.output_layer.weight.__dict__.pop("is_embedding_or_output_parameter", None)

    def _check_length(self, longest: int) -> None:
        if longest and longest > self.preset.max_position_embeddings:
            # Above this length InternLM2's dynamic NTK RoPE changes the base; we never
            # silently diverge from the HF model, we refuse.
            raise ValueError(f"sequence of {longest} tokens exceeds max_position_embeddings "
                             f"{self.preset.max_position_embeddings} of preset {self.preset.name}")

    @property
    def reward_head(self) -> Optional[RewardHead]:
        return self.output_layer if self.post_process else None

    def forward(self, input_ids, position_ids, attention_mask=None, packed_seq_params=None,
                **kwargs):
        if isinstance(packed_seq_params, SharedPrefixParams):
            # Candidates continue the positions of their prefix: RoPE at the pack's
            # position ids, not restarted per segment.
            self._check_length(packed_seq_params.max_position)
            with rope_at_positions(self, position_ids, packed_seq_params.max_position):
                return super().forward(input_ids, position_ids, attention_mask,
                                       packed_seq_params=packed_seq_params, **kwargs)
        longest = (packed_seq_params.max_seqlen_q if packed_seq_params is not None
                   else (input_ids.shape[1] if input_ids is not None else 0))
        if longest and longest > self.preset.max_position_embeddings and packed_seq_params:
            # max_seqlen_q covers the end padding of a pack (given to its last sequence);
            # only real tokens count, so measure them (a sync, but only in this rare case).
            cu = packed_seq_params.cu_seqlens_q
            longest = int((cu[1:] - cu[:-1]).max())
        self._check_length(longest)
        return super().forward(input_ids, position_ids, attention_mask,
                               packed_seq_params=packed_seq_params, **kwargs)


def _with_final_norm(spec, config: TransformerConfig, vp_stage, pg_collection):
    """A local-spec layer spec as a block spec whose final norm is `LocalRMSNorm` too (given a
    bare layer spec, megatron would pick its own norm class for the final norm,
    transformer/transformer_block.py 0.16.1, lines 252-259). Other specs pass through."""
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from megatron_polar.model.norm import LocalRMSNorm

    if not (isinstance(spec, ModuleSpec)
            and getattr(spec.submodules, "input_layernorm", None) is LocalRMSNorm):
        return spec
    pp_rank = pg_collection.pp.rank() if pg_collection is not None else None
    layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=LocalRMSNorm)


class _TensorParallelWithRewardHead:
    """`megatron.core.tensor_parallel` as gpt_model.py sees it while a PolarRewardModel is
    built, except that the one ColumnParallelLinear it makes there, the vocab-sized output
    layer (megatron/core/models/gpt/gpt_model.py 0.16.1, line 241), is our RewardHead: a
    reward model never allocates or initialises the [vocab, h] LM head (0.76 GB in bf16 for
    POLAR-7B at TP=1)."""

    def __init__(self, real, zero_init: bool):
        self._real, self._zero_init = real, zero_init

    def __getattr__(self, name):
        return getattr(self._real, name)

    def ColumnParallelLinear(self, input_size, output_size, *, config, tp_group=None, **kwargs):
        if tp_group is None:
            from megatron.core import parallel_state

            tp_group = parallel_state.get_tensor_model_parallel_group()
        return RewardHead(config, tp_group, zero_init=self._zero_init)


@contextlib.contextmanager
def _reward_head_as_output_layer(zero_init: bool):
    from megatron.core.models.gpt import gpt_model

    real = gpt_model.tensor_parallel
    gpt_model.tensor_parallel = _TensorParallelWithRewardHead(real, zero_init)
    try:
        yield
    finally:
        gpt_model.tensor_parallel = real


_ROPE_CHECKED = False


def _check_rope_takes_token_frequencies(model) -> None:
    """megatron-core applies RoPE to a THD pack per sequence; given one frequency row per
    packed token (as many rows as the pack), its unfused path takes each sequence's rows at
    the sequence's offset instead of from position 0 (models/common/embeddings/rope_utils.py
    0.16.1, `_apply_rotary_pos_emb_thd`, lines 206-225). Shared-prefix packs rely on that;
    checked once per process on a tiny pack, so a megatron-core without it is refused instead
    of silently giving candidates the wrong positions."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    global _ROPE_CHECKED
    if _ROPE_CHECKED:
        return
    if model.config.apply_rope_fusion:
        raise RuntimeError("shared-prefix packs need megatron's unfused RoPE "
                           "(apply_rope_fusion=False): the fused THD kernel restarts positions "
                           "per sequence")
    dim = model.config.kv_channels
    freqs = torch.arange(4, dtype=torch.float32)[:, None, None, None] * torch.linspace(
        0.1, 1.0, dim)[None, None, None, :]
    t = torch.ones(4, 1, dim)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    got = apply_rotary_pos_emb(t, freqs, config=model.config, cu_seqlens=cu,
                               cp_group=model.pg_collection.cp)
    want = apply_rotary_pos_emb(t, freqs, config=model.config, cu_seqlens=cu[[0, 2]],
                                cp_group=model.pg_collection.cp)
    if not torch.allclose(got, want):
        raise RuntimeError("this megatron-core restarts RoPE positions per packed sequence even "
                           "when given one frequency row per token; shared-prefix packs cannot "
                           "run on it. Train with --no-shared-prefix")
    _ROPE_CHECKED = True


@contextlib.contextmanager
def rope_at_positions(model, position_ids: torch.Tensor, reach: int):
    """Inside: `model.rotary_pos_emb` returns one frequency row per packed token, the row of
    its position id (`reach` > every position id), so megatron rotates each token at its own
    position (see `_check_rope_takes_token_frequencies`)."""
    _check_rope_takes_token_frequencies(model)
    rotary = model.rotary_pos_emb
    table_of = rotary.forward
    positions = position_ids.reshape(-1)

    def at_positions(max_seq_len, *args, **kwargs):
        return table_of(reach, *args, **kwargs)[positions]

    rotary.forward = at_positions
    try:
        yield
    finally:
        del rotary.forward


def rewards_at(token_scores: torch.Tensor, reward_positions: torch.Tensor) -> torch.Tensor:
    """Pick the reward of each sequence from per-token scores.

    token_scores: [b, s, 1]; reward_positions: [n, 2] (batch row, position) -> [n] fp32.
    """
    return token_scores[reward_positions[:, 0], reward_positions[:, 1], 0].float()
