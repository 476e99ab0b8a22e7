"""The reward model's starting point, as in the paper: a language model trained on the corpus.

POLAR initialises its RM from the base LLM (InternLM2.5). The demo's base LLM is a Llama
policy trained in the RM's shape; it is written in the HF InternLM2 base-model layout (the
layout `tools/convert_hf.py import` reads: fused `wqkv` interleaved per KV group, `w1`/`w3`/`w2`,
an `output.weight` LM head that the import drops) and imported like any InternLM2.5 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_polar.convert.hf_config import base_model_config
from megatron_polar.convert.hf_files import SafetensorsShardWriter
from megatron_polar.model.presets import ModelPreset


def llama_to_internlm2(llama_dir: Path, out_dir: Path, preset: ModelPreset) -> Path:
    """Write the Llama checkpoint `llama_dir` (shaped as `preset`) as an InternLM2 base model."""
    from safetensors.torch import load_file

    w = load_file(str(llama_dir / "model.safetensors"))
    heads, groups, d = preset.num_attention_heads, preset.num_query_groups, preset.head_dim
    per_group = heads // groups
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsShardWriter(out_dir, 5 * 10**9)
    writer.add("model.tok_embeddings.weight", w["model.embed_tokens.weight"])
    for i in range(preset.num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        q = w[src + "self_attn.q_proj.weight"].view(groups, per_group * d, -1)
        k = w[src + "self_attn.k_proj.weight"].view(groups, d, -1)
        v = w[src + "self_attn.v_proj.weight"].view(groups, d, -1)
        # Rows per KV group g: its query heads, then k_g, then v_g (docs/export.md, "Import").
        writer.add(dst + "attention.wqkv.weight",
                   torch.cat([q, k, v], dim=1).reshape(-1, preset.hidden_size))
        writer.add(dst + "attention.wo.weight", w[src + "self_attn.o_proj.weight"])
        writer.add(dst + "feed_forward.w1.weight", w[src + "mlp.gate_proj.weight"])
        writer.add(dst + "feed_forward.w3.weight", w[src + "mlp.up_proj.weight"])
        writer.add(dst + "feed_forward.w2.weight", w[src + "mlp.down_proj.weight"])
        writer.add(dst + "attention_norm.weight", w[src + "input_layernorm.weight"])
        writer.add(dst + "ffn_norm.weight", w[src + "post_attention_layernorm.weight"])
    writer.add("model.norm.weight", w["model.norm.weight"])
    writer.add("output.weight", w["lm_head.weight"])
    writer.close()
    config = base_model_config(preset, "fp32")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
