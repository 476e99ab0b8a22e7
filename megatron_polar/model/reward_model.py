"""The POLAR reward model: megatron-core's GPTModel with a scalar head instead of the LM head.

The decoder (embeddings, layers, final RMSNorm, RoPE) is megatron's GPTModel unchanged. On the
last pipeline stage the vocab projection (`output_layer`) is replaced by `RewardHead`, a
hidden -> 1 linear kept in fp32. GPTModel's own forward then returns per-token scores
[b, s, 1]; the reward of a sequence is the score at its last token (the reward token), which
`rewards_at` picks out. Per-token scores are what a value model needs too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_polar.model.presets import ModelPreset


class RewardHead(MegatronModule):
    """Linear hidden -> 1 without bias, in fp32 (released checkpoints call it `v_head`).

    One output cannot be split over tensor-parallel ranks, so the weight is replicated: every
    TP rank sees the same full hidden state and computes the same gradient.
    """

    def __init__(self, config: TransformerConfig, tp_group, zero_init: bool = False):
        super().__init__(config=config)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        self.weight = torch.nn.Parameter(
            torch.empty(1, config.hidden_size, dtype=torch.float32, device=device))
        if zero_init:
            torch.nn.init.zeros_(self.weight)
        elif config.perform_initialization:
            torch.nn.init.normal_(self.weight, mean=0.0, std=config.init_method_std)
        self.tp_group = tp_group
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        """[s, b, h] -> ([s, b, 1] fp32 scores, None); signature of megatron's output layer."""
        if self.sequence_parallel:
            # Downstream is replicated, so the backward must split, not reduce-scatter.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.tp_group)
        # Float16Module casts the whole model to bf16; the head is cast back after wrapping
        # (see `keep_reward_head_fp32`), and its input is promoted here.
        return F.linear(hidden_states.float(), self.weight.float()), None


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
        super().__init__(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
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
        if post_process:
            # GPTModel built a vocab-sized projection; a reward model never uses it. Replacing
            # it frees that memory and lets GPTModel's forward apply our head instead.
            self.output_layer = RewardHead(config, self.pg_collection.tp, zero_init=zero_init_head)

    @property
    def reward_head(self) -> Optional[RewardHead]:
        return self.output_layer if self.post_process else None

    def forward(self, input_ids, position_ids, attention_mask=None, packed_seq_params=None,
                **kwargs):
        longest = (packed_seq_params.max_seqlen_q if packed_seq_params is not None
                   else (input_ids.shape[1] if input_ids is not None else 0))
        if longest and longest > self.preset.max_position_embeddings and packed_seq_params:
            # max_seqlen_q covers the end padding of a pack (given to its last sequence);
            # only real tokens count, so measure them (a sync, but only in this rare case).
            cu = packed_seq_params.cu_seqlens_q
            longest = int((cu[1:] - cu[:-1]).max())
        if longest and longest > self.preset.max_position_embeddings:
            # Above this length InternLM2's dynamic NTK RoPE changes the base; we never
            # silently diverge from the HF model, we refuse.
            raise ValueError(f"sequence of {longest} tokens exceeds max_position_embeddings "
                             f"{self.preset.max_position_embeddings} of preset {self.preset.name}")
        return super().forward(input_ids, position_ids, attention_mask,
                               packed_seq_params=packed_seq_params, **kwargs)


def keep_reward_head_fp32(model_chunk: torch.nn.Module) -> None:
    """Undo a bf16 cast of the reward head (megatron's Float16Module casts every parameter)."""
    for module in model_chunk.modules():
        if isinstance(module, RewardHead):
            module.float()


def rewards_at(token_scores: torch.Tensor, reward_positions: torch.Tensor) -> torch.Tensor:
    """Pick the reward of each sequence from per-token scores.

    token_scores: [b, s, 1]; reward_positions: [n, 2] (batch row, position) -> [n] fp32.
    """
    return token_scores[reward_positions[:, 0], reward_positions[:, 1], 0].float()
