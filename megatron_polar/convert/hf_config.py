"""HF `config.json` of InternLM2/2.5 models <-> our `ModelPreset`.

Import derives the preset from the file (so any InternLM2-shaped checkpoint converts, not only
the shapes we ship presets for); export writes the released POLAR layout back. Everything we do
not model (e.g. `attn_implementation`) is carried through from the imported file untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_polar.model.presets import ModelPreset, RopeScaling

BASE_ARCHITECTURES = ("InternLM2ForCausalLM",)
REWARD_ARCHITECTURES = ("InternLM2ForRewardModel",)
REWARD_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForRewardModel",
}
# Preset fields compared when a preset name is given as well as a config.json.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "ffn_hidden_size", "vocab_size", "rotary_base", "rope_scaling",
                "max_position_embeddings", "norm_epsilon")
POLAR_REWARD_TOKEN_ID = 92527  # [UNUSED_TOKEN_130] in InternLM2 tokenizers
HF_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConversionError(ValueError):
    """An input that cannot be converted; the message names the file or tensor."""


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found (an HF model directory has a config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def is_reward_config(config: dict) -> bool:
    return any(a in REWARD_ARCHITECTURES for a in config.get("architectures") or [])


def preset_from_hf_config(config: dict, source: str = "config.json",
                          reward_token_id: Optional[int] = None) -> ModelPreset:
    """The preset an InternLM2 `config.json` describes; unknown architectures are refused."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "internlm2" or not any(
            a in BASE_ARCHITECTURES + REWARD_ARCHITECTURES for a in archs):
        raise ConversionError(
            f"{source}: unsupported model (model_type={config.get('model_type')!r}, "
            f"architectures={archs}); expected model_type 'internlm2' with one of "
            f"{list(BASE_ARCHITECTURES + REWARD_ARCHITECTURES)}")

    def need(key: str) -> Any:
        if key not in config:
            raise ConversionError(f"{source}: missing field '{key}'")
        return config[key]

    if config.get("bias", False):
        raise ConversionError(f"{source}: bias=true is not supported (InternLM2.5 has no biases)")
    if config.get("tie_word_embeddings", False):
        raise ConversionError(f"{source}: tie_word_embeddings=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {config['hidden_act']!r} (expected 'silu')")
    scaling = config.get("rope_scaling")
    try:
        rope = None if scaling is None else RopeScaling(
            type=scaling.get("type", scaling.get("rope_type")), factor=float(scaling["factor"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{source}: rope_scaling {scaling!r} not supported ({e})") from None
    heads = need("num_attention_heads")
    token = reward_token_id if reward_token_id is not None else config.get("reward_token_id")
    if token is None and need("vocab_size") <= POLAR_REWARD_TOKEN_ID:
        raise ConversionError(f"{source} has no reward_token_id and POLAR's "
                              f"({POLAR_REWARD_TOKEN_ID}) is outside its vocab of {config['vocab_size']}; pass "
                              "--reward-token-id")
    try:
        return ModelPreset(
            name=str(config.get("_name_or_path") or "hf"),
            num_layers=need("num_hidden_layers"), hidden_size=need("hidden_size"),
            num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads", heads),
            ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
            rotary_base=float(config.get("rope_theta", 10000.0)), rope_scaling=rope,
            max_position_embeddings=need("max_position_embeddings"),
            norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
            bos_token_id=config.get("bos_token_id", 1), eos_token_id=config.get("eos_token_id", 2),
            pad_token_id=config.get("pad_token_id", 2),
            reward_token_id=POLAR_REWARD_TOKEN_ID if token is None else int(token),
        )
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None


def check_same_shape(derived: ModelPreset, given: ModelPreset, source: str) -> None:
    """A preset named on the command line must describe the checkpoint being converted."""
    diffs = [f"{f}: {getattr(derived, f)} in {source}, {getattr(given, f)} in preset "
             f"{given.name}" for f in derived.differences(given, SHAPE_FIELDS)]
    if diffs:
        raise ConversionError("the checkpoint does not match the given preset: " + "; ".join(diffs))


def reward_model_config(preset: ModelPreset, dtype: str, carried: Optional[dict] = None) -> dict:
    """The `config.json` of an exported POLAR reward model (the released layout)."""
    config = dict(carried or {})
    for stale in ("_name_or_path", "auto_map", "architectures", "torch_dtype", "dtype"):
        config.pop(stale, None)
    rope = preset.rope_scaling
    config.update({
        "architectures": list(REWARD_ARCHITECTURES),
        "auto_map": dict(REWARD_AUTO_MAP),
        "model_type": "internlm2",
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.ffn_hidden_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_query_groups,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": preset.norm_epsilon,
        "rope_theta": preset.rotary_base,
        "rope_scaling": None if rope is None else {"type": rope.type, "factor": rope.factor},
        "bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": preset.bos_token_id,
        "eos_token_id": preset.eos_token_id,
        "pad_token_id": preset.pad_token_id,
        "reward_token_id": preset.reward_token_id,
        "torch_dtype": {v: k for k, v in HF_DTYPES.items()}[dtype],
    })
    config.setdefault("initializer_range", 0.02)
    config.setdefault("use_cache", True)
    config.setdefault("pretraining_tp", 1)
    config.setdefault("attn_implementation", "eager")
    return config


def base_model_config(preset: ModelPreset, dtype: str) -> dict:
    """The `config.json` of an InternLM2 base LM (`InternLM2ForCausalLM`, no reward token), as
    InternLM2.5 checkpoints ship it."""
    config = reward_model_config(preset, dtype)
    config["architectures"] = ["InternLM2ForCausalLM"]
    config["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                          "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    config.pop("reward_token_id")
    return config
