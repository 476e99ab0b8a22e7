"""Model presets as data: the InternLM2/2.5 shapes POLAR reward models are built on.

A preset holds only architecture facts (what `config.json` of an HF InternLM2 checkpoint holds);
how the model is run (precision, parallelism, FP8) lives in `ModelRunConfig` in `config.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling`. InternLM2 uses "dynamic" NTK scaling, which changes the RoPE base only
    for sequences longer than `max_position_embeddings`; below that, plain RoPE is exact."""

    type: str = "dynamic"
    factor: float = 2.0

    def __post_init__(self):
        if self.type not in ("dynamic",):
            raise ValueError(f"rope_scaling.type {self.type!r} is not supported (only 'dynamic')")
        if self.factor < 1.0:
            raise ValueError(f"rope_scaling.factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class ModelPreset:
    """Architecture of an InternLM2-style decoder used as a POLAR reward model."""

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA)
    ffn_hidden_size: int
    vocab_size: int
    rotary_base: float = 1_000_000.0
    rope_scaling: Optional[RopeScaling] = field(default_factory=RopeScaling)
    max_position_embeddings: int = 32768
    norm_epsilon: float = 1e-5
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2
    reward_token_id: int = 92527
    # The size the model is known by (1.8B, 7B); the hyperparameter laws are fitted on it.
    nominal_parameters: Optional[float] = None

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"preset {self.name}: {name} must be positive")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"preset {self.name}: hidden_size not divisible by attention heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"preset {self.name}: attention heads not divisible by KV heads")
        if not 0 <= self.reward_token_id < self.vocab_size:
            raise ValueError(f"preset {self.name}: reward_token_id {self.reward_token_id} "
                             f"outside vocab of {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, with_head: bool = True) -> int:
        """Parameter count (embeddings, layers, final norm, reward head; no LM head)."""
        h, kv = self.hidden_size, self.num_query_groups * self.head_dim
        attn = h * (h + 2 * kv) + h * h
        mlp = 3 * h * self.ffn_hidden_size
        layer = attn + mlp + 2 * h
        return self.vocab_size * h + self.num_layers * layer + h + (h if with_head else 0)

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: "ModelPreset", fields=None) -> list[str]:
        """Names of the fields (default: all but `name`) whose values differ from `other`'s."""
        names = fields or [f.name for f in dataclasses.fields(self) if f.name != "name"]
        return [f for f in names if getattr(self, f) != getattr(other, f)]

    @classmethod
    def from_dict(cls, data: dict, source: str = "preset") -> "ModelPreset":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown preset field(s) {unknown}")
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None


_INTERNLM2_5_1_8B = ModelPreset(
    name="internlm2_5-1_8b", num_layers=24, hidden_size=2048, num_attention_heads=16,
    num_query_groups=8, ffn_hidden_size=8192, vocab_size=92544, nominal_parameters=1.8e9,
)
_INTERNLM2_5_7B = ModelPreset(
    name="internlm2_5-7b", num_layers=32, hidden_size=4096, num_attention_heads=32,
    num_query_groups=8, ffn_hidden_size=14336, vocab_size=92544, nominal_parameters=7e9,
)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        _INTERNLM2_5_1_8B,
        _INTERNLM2_5_7B,
        # The released POLAR-7B keeps the 7B shape but uses the long-context RoPE settings.
        _INTERNLM2_5_7B.replace(name="polar-7b", rotary_base=50_000_000.0,
                                max_position_embeddings=262144),
        _INTERNLM2_5_1_8B.replace(name="polar-1_8b"),
        # Tiny shapes for tests and the CPU demo. GQA (4 heads, 2 KV heads) so TP=2 splits groups.
        ModelPreset(name="tiny", num_layers=4, hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=176, vocab_size=512,
                    max_position_embeddings=4096, reward_token_id=511),
        ModelPreset(name="tiny-2l", num_layers=2, hidden_size=32, num_attention_heads=4,
                    num_query_groups=2, ffn_hidden_size=96, vocab_size=256,
                    max_position_embeddings=4096, reward_token_id=255),
        ModelPreset(name="small", num_layers=8, hidden_size=256, num_attention_heads=8,
                    num_query_groups=4, ffn_hidden_size=704, vocab_size=8192,
                    max_position_embeddings=8192, reward_token_id=8191),
    )
}


MODEL_FILE = "model.json"  # the preset of a checkpoint, written beside its weights


def get_preset(name: str) -> ModelPreset:
    """A preset by name, or from a `model.json` file (or a checkpoint directory holding one,
    as HF import and the trainer write), with the known names in the error."""
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if path.is_dir():
        path = path / MODEL_FILE
    if path.is_file():
        try:
            return ModelPreset.from_dict(json.loads(path.read_text()), source=str(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    raise ValueError(f"unknown model preset {name!r} (not a preset name, nor a {MODEL_FILE} or a "
                     f"directory with one); known names: {', '.join(sorted(PRESETS))}")


def checkpoint_preset(directory) -> Optional[ModelPreset]:
    """The preset recorded in a checkpoint directory, if it records one."""
    path = Path(directory) / MODEL_FILE
    return get_preset(str(path)) if path.is_file() else None
