"""Which HF InternLM2 tensors make which megatron-core checkpoint tensor.

Names on the megatron side are the *checkpoint* keys of `PolarRewardModel` with per-layer keys
(see `training/checkpointing.py`); megatron already names norms the Transformer Engine way
(`linear_qkv.layer_norm_weight`) for either layer spec, so one mapping serves CPU and GPU runs.

Two facts make the mapping a rename plus one concatenation:
- InternLM2's fused `wqkv` is interleaved per KV group (q heads of group g, then k_g, then v_g),
  which is exactly megatron's `linear_qkv` layout;
- megatron's SwiGLU `linear_fc1` holds gate then up, i.e. `cat([w1, w3])`; its sharded state
  dict stores that global tensor whatever the TP size.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_polar.model.presets import ModelPreset

HF_HEAD = "v_head.weight"
HF_LM_HEAD = "output.weight"  # base models only; a reward model has no LM head
# Non-parameter buffers some `pytorch_model.bin` files carry; they are recomputed, not stored.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor = the HF tensors `hf` concatenated along dim 0, in order."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.hf_shapes[0]
        return (sum(s[0] for s in self.hf_shapes),) + tuple(first[1:])


@dataclass(frozen=True)
class Unit:
    """Tensors converted and saved together: the embedding, one layer, or the final norm+head."""

    name: str
    maps: tuple[TensorMap, ...]
    key_prefixes: tuple[str, ...]  # megatron keys (incl. extra state) that belong to the unit

    def numel(self) -> int:
        total = 0
        for m in self.maps:
            n = 1
            for d in m.shape:
                n *= d
            total += n
        return total


def units(preset: ModelPreset) -> list[Unit]:
    h, ffn = preset.hidden_size, preset.ffn_hidden_size
    hd, heads, kv = preset.head_dim, preset.num_attention_heads, preset.num_query_groups

    def one(meg, hf, shape):
        return TensorMap(meg, (hf,), (shape,))

    out = [Unit("embedding", (one("embedding.word_embeddings.weight", "model.tok_embeddings.weight",
                                  (preset.vocab_size, h)),), ("embedding.",))]
    for i in range(preset.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out.append(Unit(f"layer {i}", (
            one(m + "self_attention.linear_qkv.layer_norm_weight", p + "attention_norm.weight",
                (h,)),
            one(m + "self_attention.linear_qkv.weight", p + "attention.wqkv.weight",
                ((heads + 2 * kv) * hd, h)),
            one(m + "self_attention.linear_proj.weight", p + "attention.wo.weight",
                (h, heads * hd)),
            one(m + "mlp.linear_fc1.layer_norm_weight", p + "ffn_norm.weight", (h,)),
            TensorMap(m + "mlp.linear_fc1.weight", (p + "feed_forward.w1.weight",
                                                     p + "feed_forward.w3.weight"),
                      ((ffn, h), (ffn, h))),
            one(m + "mlp.linear_fc2.weight", p + "feed_forward.w2.weight", (h, ffn)),
        ), (m,)))
    out.append(Unit("final norm and reward head", (
        one("decoder.final_layernorm.weight", "model.norm.weight", (h,)),
        one("output_layer.weight", HF_HEAD, (1, h)),
    ), ("decoder.final_layernorm.", "output_layer.")))
    return out


def ignorable(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)
