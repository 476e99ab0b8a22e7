"""HF `config.json` of InternLM2/2.5 models (and of our Llama export) <-> our `ModelPreset`.

Import derives the preset from the file (so any InternLM2-shaped checkpoint converts, not only
the shapes we ship presets for); export writes the released POLAR layout back, or the
`LlamaForSequenceClassification` layout that consumers without remote code load natively.
Everything we do not model (e.g. `attn_implementation`) is carried through from an imported
InternLM2 file untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_polar.convert.layout import INTERNLM2, LLAMA_SEQCLS
from megatron_polar.model.presets import ModelPreset, RopeScaling

BASE_ARCHITECTURES = ("InternLM2ForCausalLM",)
REWARD_ARCHITECTURES = ("InternLM2ForRewardModel",)
LLAMA_SEQCLS_ARCHITECTURES = ("LlamaForSequenceClassification",)
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
    return any(a in REWARD_ARCHITECTURES + LLAMA_SEQCLS_ARCHITECTURES
               for a in config.get("architectures") or [])


def hf_layout(config: dict, source: str = "config.json") -> str:
    """Which layout (`layout.LAYOUTS`) a `config.json` describes; anything else is refused."""
    archs = config.get("architectures") or []
    if config.get("model_type") == "internlm2" and any(
            a in BASE_ARCHITECTURES + REWARD_ARCHITECTURES for a in archs):
        return INTERNLM2
    if config.get("model_type") == "llama" and any(a in LLAMA_SEQCLS_ARCHITECTURES for a in archs):
        return LLAMA_SEQCLS
    raise ConversionError(
        f"{source}: unsupported model (model_type={config.get('model_type')!r}, "
        f"architectures={archs}); expected model_type 'internlm2' with one of "
        f"{list(BASE_ARCHITECTURES + REWARD_ARCHITECTURES)}, or model_type 'llama' with "
        f"{list(LLAMA_SEQCLS_ARCHITECTURES)} (our --format llama-seqcls export)")


def _rope_from_config(config: dict, source: str) -> tuple[float, Optional[RopeScaling]]:
    """RoPE base and scaling: `rope_theta` + `rope_scaling` (InternLM2, transformers 4), or
    `rope_parameters` (what transformers 5 writes when it re-saves a Llama config)."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = config.get("rope_theta", 10000.0), config.get("rope_scaling")
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "default":  # transformers' name for plain RoPE
        scaling = None
    original = None if scaling is None else scaling.get("original_max_position_embeddings")
    if original is not None and original != config.get("max_position_embeddings"):
        # InternLM2's dynamic NTK starts scaling past max_position_embeddings, not elsewhere.
        raise ConversionError(f"{source}: rope_scaling.original_max_position_embeddings "
                              f"{original} differs from max_position_embeddings "
                              f"{config.get('max_position_embeddings')}; not supported")
    try:
        rope = None if scaling is None else RopeScaling(type=kind, factor=float(scaling["factor"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{source}: rope_scaling {scaling!r} not supported ({e})") from None
    return float(theta), rope


def _check_llama_seqcls(config: dict, source: str) -> None:
    """What a LlamaForSequenceClassification config may hold and still be a POLAR RM."""
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) else config.get("num_labels", 2)
    if num_labels != 1:
        raise ConversionError(f"{source}: {num_labels} labels (id2label/num_labels); a reward "
                              "model has one")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag, False):
            raise ConversionError(f"{source}: {flag}=true is not supported (InternLM2.5 has no "
                                  "biases)")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is not None and heads and head_dim * heads != config.get("hidden_size"):
        raise ConversionError(f"{source}: head_dim {head_dim} x {heads} heads is not "
                              f"hidden_size {config.get('hidden_size')}")


def preset_from_hf_config(config: dict, source: str = "config.json",
                          reward_token_id: Optional[int] = None) -> ModelPreset:
    """The preset a `config.json` (InternLM2, or our Llama export) describes; unknown
    architectures are refused."""
    layout = hf_layout(config, source)

    def need(key: str) -> Any:
        if key not in config:
            raise ConversionError(f"{source}: missing field '{key}'")
        return config[key]

    if layout == LLAMA_SEQCLS:
        _check_llama_seqcls(config, source)
    if config.get("bias", False):
        raise ConversionError(f"{source}: bias=true is not supported (InternLM2.5 has no biases)")
    if config.get("tie_word_embeddings", False):
        raise ConversionError(f"{source}: tie_word_embeddings=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {config['hidden_act']!r} (expected 'silu')")
    theta, rope = _rope_from_config(config, source)
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
            rotary_base=theta, rope_scaling=rope,
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
        **_network_fields(preset, dtype),
        "rope_scaling": None if rope is None else {"type": rope.type, "factor": rope.factor},
        "bias": False,
    })
    config.setdefault("initializer_range", 0.02)
    config.setdefault("use_cache", True)
    config.setdefault("pretraining_tp", 1)
    config.setdefault("attn_implementation", "eager")
    return config


def llama_seqcls_config(preset: ModelPreset, dtype: str) -> dict:
    """The `config.json` of the `--format llama-seqcls` export: `LlamaForSequenceClassification`
    with one label, which transformers, vLLM, sglang, TRL and OpenRLHF build without remote code.

    `pad_token_id` matters here as it does not for InternLM2ForRewardModel: Llama's classifier
    reads the score at the last token that is not `pad_token_id` (transformers >= 5: the
    rightmost non-pad token, so left or right padding; transformers 4.48: the token before the
    first pad, so right padding only). A POLAR sequence ends with the reward token, so the pad
    id must be one the sequence never holds (the exporter checks it); the preset's pad id is
    InternLM2's EOS (2), which a sentencepiece tokenizer never emits from text.
    `problem_type: "regression"` says the one label is a real-valued score (transformers'
    default for one label); vLLM reads it to return the raw score rather than its sigmoid.
    `rope_theta`/`rope_scaling` are written the transformers 4 way, which every consumer reads
    (transformers 5 turns them into `rope_parameters`); `reward_token_id` is not a Llama field
    but is kept in the config (transformers keeps unknown fields) so import restores it.
    """
    rope = preset.rope_scaling
    return {
        "architectures": list(LLAMA_SEQCLS_ARCHITECTURES),
        "model_type": "llama",
        **_network_fields(preset, dtype),
        "head_dim": preset.head_dim,
        "rope_scaling": None if rope is None else {"rope_type": rope.type, "type": rope.type,
                                                   "factor": rope.factor},
        "attention_bias": False,
        "mlp_bias": False,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "problem_type": "regression",
    }


def _network_fields(preset: ModelPreset, dtype: str) -> dict:
    """The fields both layouts write alike: sizes, RoPE base, norm eps, special ids, dtype."""
    return {
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
        "tie_word_embeddings": False,
        "bos_token_id": preset.bos_token_id,
        "eos_token_id": preset.eos_token_id,
        "pad_token_id": preset.pad_token_id,
        "reward_token_id": preset.reward_token_id,
        "torch_dtype": {v: k for k, v in HF_DTYPES.items()}[dtype],
    }


def base_model_config(preset: ModelPreset, dtype: str) -> dict:
    """The `config.json` of an InternLM2 base LM (`InternLM2ForCausalLM`, no reward token), as
    InternLM2.5 checkpoints ship it."""
    config = reward_model_config(preset, dtype)
    config["architectures"] = ["InternLM2ForCausalLM"]
    config["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                          "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    config.pop("reward_token_id")
    return config
