"""Random-weight HF InternLM2 checkpoints for tests and conversion benchmarks (no downloads).

Written tensor by tensor through the shard writer, so a 7B-shaped checkpoint never sits in
memory whole. Normal(0, std) weights, norms around 1, so forward passes give sane numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_polar.convert.hf_config import DTYPES, base_model_config, reward_model_config
from megatron_polar.convert.hf_files import SafetensorsShardWriter
from megatron_polar.convert.layout import HF_HEAD, HF_LM_HEAD, units
from megatron_polar.model.presets import ModelPreset


def write_random_internlm2(directory: str | Path, preset: ModelPreset, *, reward: bool = True,
                           dtype: torch.dtype = torch.float32, max_shard_bytes: int = 5 * 10**9,
                           seed: int = 0, std: float = 0.02) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    writer = SafetensorsShardWriter(directory, max_shard_bytes)

    def add(name, shape, norm=False):
        t = torch.randn(shape, generator=gen) * std
        writer.add(name, (1.0 + t * 5 if norm else t).to(dtype))

    for unit in units(preset):
        for m in unit.maps:
            for name, shape in zip(m.hf, m.hf_shapes):
                if name == HF_HEAD and not reward:
                    continue
                add(name, shape, norm=len(shape) == 1)
    if not reward:
        add(HF_LM_HEAD, (preset.vocab_size, preset.hidden_size))
    writer.close()
    dtype_name = {t: name for name, t in DTYPES.items()}[dtype]
    config = (reward_model_config if reward else base_model_config)(preset, dtype_name)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
