"""The POLAR reward model on megatron-core (docs/model.md).

- `presets`: architectures as data: `ModelPreset` (with `RopeScaling`), the named `PRESETS`
  (`internlm2_5-1_8b`, `internlm2_5-7b`, `polar-7b`, `polar-1_8b`; `tiny`, `tiny-2l` and
  `small` for tests and the demo), `get_preset`, and `checkpoint_preset` (the `model.json`,
  `MODEL_FILE`, beside a checkpoint);
- `config`: how a preset runs: `ModelRunConfig` (parallel sizes, bf16, recompute),
  `FP8Config`, and `build_transformer_config`, which makes megatron's `TransformerConfig`;
- `spec`: the layer spec, Transformer Engine's or megatron's local one (`resolve_use_te`,
  `build_layer_spec`; `FP8UnavailableError` names what FP8 lacks);
- `attention`: `PackedCoreAttention`, the local spec's core attention for packed (THD)
  sequences: one causal attention per sequence on CPU, `flex_document_attention` on CUDA
  (`flex_bucket`, `document_block_mask`); `block_causal_mask` is the dense form for tests;
- `norm`: `LocalRMSNorm`, `torch.nn.RMSNorm` marked for sequence parallelism;
- `reward_model`: `PolarRewardModel`, megatron's `GPTModel` with `RewardHead` (hidden -> 1)
  in place of the LM head, and `rewards_at`, the reward at each sequence's reward token.
"""
