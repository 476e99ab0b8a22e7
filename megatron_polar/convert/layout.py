"""Which HF tensors make which megatron-core checkpoint tensor, for each HF layout we convert.

Names on the megatron side are the *checkpoint* keys of `PolarRewardModel` with per-layer keys
(see `training/checkpointing.py`); megatron already names norms the Transformer Engine way
(`linear_qkv.layer_norm_weight`) for either layer spec, so one mapping serves CPU and GPU runs.

Two HF layouts:
- `internlm2` (the released POLAR layout, `InternLM2ForRewardModel`): a rename plus one
  concatenation. InternLM2's fused `wqkv` is interleaved per KV group (q heads of group g, then
  k_g, then v_g), which is exactly megatron's `linear_qkv` layout; megatron's SwiGLU
  `linear_fc1` holds gate then up, i.e. `cat([w1, w3])`; its sharded state dict stores that
  global tensor whatever the TP size.
- `llama-seqcls` (`LlamaForSequenceClassification`, one label): the same network under Llama's
  names, with `q_proj`/`k_proj`/`v_proj` separate. Megatron's `linear_qkv`, viewed as
  [KV groups, q heads per group + 2, head_dim, hidden], holds q_proj's heads of group g in
  slots 0..q-1 (Llama numbers q heads group-major too: head j uses KV head j // q), k_proj's
  head g in slot q and v_proj's in slot q + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_polar.model.presets import ModelPreset

INTERNLM2 = "internlm2"
LLAMA_SEQCLS = "llama-seqcls"
LAYOUTS = (INTERNLM2, LLAMA_SEQCLS)

HF_HEAD = "v_head.weight"  # InternLM2ForRewardModel's reward head
LLAMA_HEAD = "score.weight"  # LlamaForSequenceClassification's head, one label
HF_LM_HEAD = "output.weight"  # InternLM2 base models only; a reward model has no LM head
# Non-parameter buffers some `pytorch_model.bin` files carry; they are recomputed, not stored.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor = the HF tensors `hf` concatenated along dim 0, in order; or, when
    `qkv_groups` > 0, `hf` = (q, k, v) interleaved per KV group (`qkv_groups` groups)."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    qkv_groups: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.hf_shapes[0]
        return (sum(s[0] for s in self.hf_shapes),) + tuple(first[1:])

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The megatron tensor from the HF tensors (in `hf` order)."""
        if not self.qkv_groups:
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        q, k, v = pieces
        g, h = self.qkv_groups, q.shape[-1]
        head_dim = k.shape[0] // g
        return torch.cat([q.reshape(g, -1, head_dim, h), k.reshape(g, 1, head_dim, h),
                          v.reshape(g, 1, head_dim, h)], dim=1).reshape(-1, h)

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors (in `hf` order) from the megatron tensor; `join`'s inverse."""
        if not self.qkv_groups:
            return list(torch.split(tensor, [s[0] for s in self.hf_shapes]))
        g, h = self.qkv_groups, tensor.shape[-1]
        head_dim = self.hf_shapes[1][0] // g
        grouped = tensor.reshape(g, -1, head_dim, h)
        return [grouped[:, :-2].reshape(-1, h), grouped[:, -2].reshape(-1, h),
                grouped[:, -1].reshape(-1, h)]


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


def head_name(layout: str = INTERNLM2) -> str:
    """The HF name of the reward head in `layout`."""
    return LLAMA_HEAD if layout == LLAMA_SEQCLS else HF_HEAD


def units(preset: ModelPreset, layout: str = INTERNLM2) -> list[Unit]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown HF layout {layout!r}; expected one of {list(LAYOUTS)}")
    h, ffn = preset.hidden_size, preset.ffn_hidden_size
    hd, heads, kv = preset.head_dim, preset.num_attention_heads, preset.num_query_groups
    llama = layout == LLAMA_SEQCLS

    def one(meg, hf, shape):
        return TensorMap(meg, (hf,), (shape,))

    embedding = "model.embed_tokens.weight" if llama else "model.tok_embeddings.weight"
    out = [Unit("embedding", (one("embedding.word_embeddings.weight", embedding,
                                  (preset.vocab_size, h)),), ("embedding.",))]
    for i in range(preset.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv_meg = m + "self_attention.linear_qkv.weight"
        if llama:
            attention_norm, ffn_norm = p + "input_layernorm.weight", \
                p + "post_attention_layernorm.weight"
            qkv = TensorMap(qkv_meg, (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                      p + "self_attn.v_proj.weight"),
                            ((heads * hd, h), (kv * hd, h), (kv * hd, h)), qkv_groups=kv)
            proj, gate, up, down = (p + "self_attn.o_proj.weight", p + "mlp.gate_proj.weight",
                                    p + "mlp.up_proj.weight", p + "mlp.down_proj.weight")
        else:
            attention_norm, ffn_norm = p + "attention_norm.weight", p + "ffn_norm.weight"
            qkv = one(qkv_meg, p + "attention.wqkv.weight", ((heads + 2 * kv) * hd, h))
            proj, gate, up, down = (p + "attention.wo.weight", p + "feed_forward.w1.weight",
                                    p + "feed_forward.w3.weight", p + "feed_forward.w2.weight")
        out.append(Unit(f"layer {i}", (
            one(m + "self_attention.linear_qkv.layer_norm_weight", attention_norm, (h,)),
            qkv,
            one(m + "self_attention.linear_proj.weight", proj, (h, heads * hd)),
            one(m + "mlp.linear_fc1.layer_norm_weight", ffn_norm, (h,)),
            TensorMap(m + "mlp.linear_fc1.weight", (gate, up), ((ffn, h), (ffn, h))),
            one(m + "mlp.linear_fc2.weight", down, (h, ffn)),
        ), (m,)))
    out.append(Unit("final norm and reward head", (
        one("decoder.final_layernorm.weight", "model.norm.weight", (h,)),
        one("output_layer.weight", head_name(layout), (1, h)),
    ), ("decoder.final_layernorm.", "output_layer.")))
    return out


def ignorable(name: str) -> bool:
    return name.endswith(IGNORED_SUFFIXES)
