"""The reward model on one process: config mapping, head, packed == unpacked scoring."""

import pytest
import torch
import torch.nn.functional as F

from megatron_polar.data.packing import build_padded_batch, pack_pairs
from megatron_polar.model.attention import block_causal_mask
from megatron_polar.model.config import ModelRunConfig, build_transformer_config
from megatron_polar.model.presets import PRESETS, get_preset
from megatron_polar.model.reward_model import RewardHead
from megatron_polar.runtime.chunks import build_model_chunks, unwrap
from megatron_polar.runtime.schedules import score_packed, score_padded
from tests.test_parallel_parity_tiny import fixed_pairs


def test_transformer_config_is_internlm2():
    preset = get_preset("internlm2_5-7b")
    cfg = build_transformer_config(preset, ModelRunConfig(), use_te=False)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.num_query_groups == 8 and cfg.kv_channels == 128
    assert cfg.hidden_dropout == 0.0 and cfg.attention_dropout == 0.0
    assert cfg.calculate_per_token_loss


def test_presets_match_released_shapes():
    polar = get_preset("polar-7b")
    assert (polar.hidden_size, polar.num_layers, polar.num_attention_heads,
            polar.num_query_groups, polar.ffn_hidden_size, polar.vocab_size) == (
        4096, 32, 32, 8, 14336, 92544)
    assert polar.rotary_base == 50_000_000 and polar.max_position_embeddings == 262144
    assert polar.rope_scaling.type == "dynamic" and polar.rope_scaling.factor == 2.0
    assert polar.reward_token_id == 92527
    small = get_preset("internlm2_5-1_8b")
    assert (small.hidden_size, small.num_layers, small.num_attention_heads,
            small.num_query_groups, small.ffn_hidden_size) == (2048, 24, 16, 8, 8192)
    # ~7.4B without an LM head (InternLM2.5-7B is 7.7B with its 0.38B output layer).
    assert 7.2e9 < polar.num_parameters() < 7.5e9
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        get_preset("nope")
    assert "tiny" in PRESETS


def test_built_model_has_reward_head_and_no_lm_head(ctx1):
    preset = get_preset("tiny")
    chunk = build_model_chunks(preset, ModelRunConfig(), ctx1)[0]
    model = unwrap(chunk)
    assert isinstance(model.output_layer, RewardHead)
    assert model.output_layer.weight.shape == (1, preset.hidden_size)
    assert model.output_layer.weight.dtype == torch.float32
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == preset.num_parameters()
    zero = unwrap(build_model_chunks(preset, ModelRunConfig(), ctx1, zero_init_head=True)[0])
    assert torch.count_nonzero(zero.output_layer.weight) == 0


def test_packed_and_unpacked_scoring_agree(ctx1):
    preset = get_preset("tiny")
    chunks = build_model_chunks(preset, ModelRunConfig(), ctx1)
    pairs = fixed_pairs()
    packs = pack_pairs(pairs, 160, pad_id=preset.pad_token_id)
    assert len(packs) > 1 and max(p.num_pairs for p in packs) > 1  # really packed
    packed = score_packed(chunks, packs, ctx1)
    seqs = [s for pack in packs for i in pack.pair_ids for s in pairs[i]]
    batched = score_padded(chunks[0], build_padded_batch(seqs, preset.pad_token_id))
    one_by_one = torch.cat([score_padded(chunks[0], build_padded_batch([s], preset.pad_token_id))
                            for s in seqs])
    assert torch.allclose(packed, one_by_one, atol=1e-5)
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    assert packed.std() > 1e-3  # rewards differ between sequences


def test_packed_attention_never_crosses_sequences(ctx1):
    """Changing one sequence of a pack leaves every other sequence's reward unchanged."""
    preset = get_preset("tiny")
    chunks = build_model_chunks(preset, ModelRunConfig(), ctx1)
    pairs = fixed_pairs(4)
    base = score_packed(chunks, pack_pairs(pairs, 512, preset.pad_token_id), ctx1)
    changed = [list(pairs[0]), *pairs[1:]]
    changed[0] = ([5] + pairs[0][0][1:], pairs[0][1])
    packs = pack_pairs(changed, 512, preset.pad_token_id)
    assert len(packs) == 1
    after = score_packed(chunks, packs, ctx1)
    assert not torch.isclose(after[0], base[0], atol=1e-6)
    assert torch.allclose(after[1:], base[1:], atol=1e-6)


def test_sequence_longer_than_max_positions_is_refused(ctx1):
    preset = get_preset("tiny").replace(max_position_embeddings=32)
    chunk = build_model_chunks(preset, ModelRunConfig(), ctx1)[0]
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 32"):
        score_padded(chunk, build_padded_batch([list(range(3, 50))], 0))


def test_pack_padding_beyond_max_positions_is_not_a_long_sequence(ctx1):
    # Packs share one length, so a short pack ends in padding longer than the model's
    # positions; only a real sequence that long is refused.
    from megatron_polar.data.packing import build_packed_micro_batch

    preset = get_preset("tiny").replace(max_position_embeddings=32)
    chunks = build_model_chunks(preset, ModelRunConfig(), ctx1)
    short = build_packed_micro_batch([(list(range(3, 20)), list(range(3, 15)))], 96, 0)
    assert short.packed_seq_params().max_seqlen_q > 32
    assert score_packed(chunks, [short], ctx1).shape == (2,)
    long = build_packed_micro_batch([(list(range(3, 50)), list(range(3, 15)))], 96, 0)
    with pytest.raises(ValueError, match="sequence of 47 tokens exceeds"):
        score_packed(chunks, [long], ctx1)


def test_per_sequence_attention_equals_dense_block_mask():
    from megatron_polar.model.attention import PackedCoreAttention
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    cfg = build_transformer_config(get_preset("tiny"), ModelRunConfig(), use_te=False)

    class OneRank:
        def size(self):
            return 1

    pg = type("PG", (), {"tp": OneRank()})()
    attn = PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=pg)
    torch.manual_seed(0)
    t, heads, groups, d = 23, 4, 2, 16
    q, k, v = torch.randn(t, heads, d), torch.randn(t, groups, d), torch.randn(t, groups, d)
    cu = torch.tensor([0, 5, 6, 14, 20], dtype=torch.int32)  # 3 tokens of end padding
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=8, max_seqlen_kv=8)
    out = attn(q, k, v, None, packed_seq_params=params)
    mask = block_causal_mask(cu, t)
    assert not mask[6, 5] and mask[13, 6] and not mask[20, 19] and mask[22, 20]
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, enable_gqa=True, scale=d ** -0.5)
    assert torch.allclose(out, dense[0].transpose(0, 1).reshape(t, -1), atol=1e-6)


def test_flex_document_mask_equals_dense_block_mask():
    """The CUDA path's flex_attention mask (run by flex's eager reference here)."""
    from megatron_polar.model.attention import flex_document_attention

    torch.manual_seed(1)
    t, heads, groups, d = 40, 4, 2, 16
    q, k, v = torch.randn(1, heads, t, d), torch.randn(1, groups, t, d), torch.randn(1, groups, t, d)
    cu = torch.tensor([0, 5, 6, 14, 33], dtype=torch.int32)
    out = flex_document_attention(q, k, v, cu, d ** -0.5, True, compile=False)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(cu, t),
                                           enable_gqa=True, scale=d ** -0.5)
    assert torch.allclose(out, dense, atol=1e-5)


def test_bf16_model_scores_in_fp32_without_an_lm_head_and_trains(ctx1, monkeypatch):
    from megatron.core import tensor_parallel
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.training.optimizer import build_optimizer
    from megatron_polar.training.step import train_step

    built = []
    real_init = tensor_parallel.ColumnParallelLinear.__init__

    def counting_init(self, input_size, output_size, *args, **kwargs):
        built.append(output_size)
        real_init(self, input_size, output_size, *args, **kwargs)

    monkeypatch.setattr(tensor_parallel.ColumnParallelLinear, "__init__", counting_init)
    preset = get_preset("tiny")
    run = ModelRunConfig(bf16=True)
    chunks = build_model_chunks(preset, run, ctx1)
    model = unwrap(chunks[0])
    # The vocab-sized LM head is never built: the only vocab-sized tensor is the embedding.
    assert preset.vocab_size not in built
    assert [n for n, p in model.named_parameters() if preset.vocab_size in p.shape] == [
        "embedding.word_embeddings.weight"]
    # The head is stored like every weight (one dtype for the distributed optimizer's groups)
    # and computed in fp32.
    assert model.output_layer.weight.dtype == torch.bfloat16
    assert not hasattr(model.output_layer.weight, "is_embedding_or_output_parameter")
    assert model.decoder.layers[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    tokens = torch.randint(3, preset.vocab_size, (1, 16))
    scores = chunks[0](tokens, torch.arange(16)[None], None)
    assert scores.dtype == torch.float32 and scores.shape == (1, 16, 1)
    optimizer = build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-3, bf16=True,
                                                        params_dtype=torch.bfloat16), ctx1)
    packs = pack_pairs(fixed_pairs(4), 256, preset.pad_token_id)
    before = model.output_layer.weight.detach().clone()
    result = train_step(chunks, optimizer, packs, ctx1)
    assert result.update_successful and torch.isfinite(torch.tensor(result.metrics.loss))
    assert not torch.equal(before, model.output_layer.weight.detach())
