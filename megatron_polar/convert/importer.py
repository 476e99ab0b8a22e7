"""HF InternLM2/2.5 (base or `InternLM2ForRewardModel`), or our `LlamaForSequenceClassification`
export (`--format llama-seqcls`) -> megatron-core weights checkpoint.

The output is a weights checkpoint (`training/checkpointing.py`) in parts: each part is a
megatron-core distributed checkpoint of a few whole layers (plus the embedding in the first and
the final norm and reward head in the last), listed in `polar_weights.json`. Parts are what keep
memory near one part instead of the whole model: megatron's `dist_checkpointing.save` needs every
tensor it writes in memory at once. The tensors come from a model built on the `meta` device at
TP=1/PP=1, so keys, shapes and the SwiGLU factory are exactly the trainer's; dist checkpoints are
global tensors, which is why the checkpoint loads at any TP/PP.

Also written: `model.json` (the preset derived from `config.json`), `tokenizer/` (the model's
tokenizer files, when present), and `hf/` (the source `config.json` and the remote-code `.py`
files, which export copies back so the exported directory loads where the source loaded).
Everything goes to `OUT.tmp` and is renamed to `OUT` at the end.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_polar.convert.hf_config import (ConversionError, check_same_shape, hf_layout,
                                              is_reward_config, preset_from_hf_config,
                                              read_hf_config)
from megatron_polar.convert.hf_files import HFWeightReader, copy_remote_code
from megatron_polar.convert.layout import (HF_LM_HEAD, INTERNLM2, Unit, head_name, ignorable,
                                           units)
from megatron_polar.model.presets import ModelPreset, get_preset
from megatron_polar.runtime.checkpoints import SHARDED_METADATA, WEIGHTS_INDEX, write_manifest

DEFAULT_PART_BYTES = 1 << 30


@dataclass
class ImportReport:
    out: Path
    preset: ModelPreset
    reward_head: str  # "kept" or "zero"
    parts: int
    tensors: int
    dropped: list[str]

    def line(self) -> str:
        return (f"imported {self.tensors} tensors into {self.parts} part(s) at {self.out} "
                f"({self.preset.num_layers} layers, hidden {self.preset.hidden_size}, vocab "
                f"{self.preset.vocab_size}); reward head {self.reward_head}"
                + (f"; not imported: {', '.join(self.dropped)}" if self.dropped else ""))


def check_layout(preset: ModelPreset, tp: int, pp: int, source: str) -> None:
    """Refuse a TP/PP layout the model cannot be split into (checked before any work)."""
    if tp < 1 or pp < 1:
        raise ConversionError(f"{source}: TP and PP must be >= 1, got TP={tp} PP={pp}")
    problems = [f"{what} {n} is not divisible by TP={tp}" for what, n in (
        ("attention heads", preset.num_attention_heads), ("KV heads", preset.num_query_groups),
        ("ffn_hidden_size", preset.ffn_hidden_size), ("vocab_size", preset.vocab_size))
        if n % tp]
    if preset.num_layers % pp:
        problems.append(f"{preset.num_layers} layers are not divisible by PP={pp}")
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def check_weights(reader: HFWeightReader, plan: list[Unit], reward: bool,
                  layout: str = INTERNLM2) -> list[str]:
    """Every tensor we need is there with its shape; anything else is an error, except the LM
    head of a base model and recomputed buffers (returned as dropped)."""
    needed = {}
    for unit in plan:
        for m in unit.maps:
            needed.update(zip(m.hf, m.hf_shapes))
    if not reward:
        needed.pop(head_name(layout))
    for name, shape in needed.items():
        if name not in reader:
            raise ConversionError(f"{reader.dir}: tensor {name} is missing from the weights")
        if tuple(reader.shape(name)) != tuple(shape):
            raise ConversionError(f"{reader.file_of(name)}: tensor {name} has shape "
                                  f"{list(reader.shape(name))}, config.json implies {list(shape)}")
    dropped = [n for n in reader.names() if n not in needed]
    unexpected = [n for n in dropped if not (ignorable(n) or (
        n == HF_LM_HEAD and not reward and layout == INTERNLM2))]
    if unexpected:
        kind = ("LlamaForSequenceClassification" if layout != INTERNLM2 else
                f"InternLM2 {'reward' if reward else 'base'}")
        raise ConversionError(f"{reader.file_of(unexpected[0])}: unexpected tensor(s) "
                              f"{unexpected[:5]} for an {kind} model")
    return dropped


def check_tokenizer(path: Path, preset: ModelPreset) -> None:
    """The tokenizer must fit the model: no id beyond the embedding, and the same reward token."""
    from megatron_polar.data.tokenizer import PolarTokenizer

    try:
        tok = PolarTokenizer(path, reward_token_id=preset.reward_token_id)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(f"tokenizer {path}: {e}") from None
    if tok.vocab_size > preset.vocab_size:
        raise ConversionError(f"tokenizer {path} has {tok.vocab_size} tokens, more than the "
                              f"model's vocab_size {preset.vocab_size}")


def meta_sharded_state_dict(preset: ModelPreset) -> dict:
    """The TP=1/PP=1 sharded state dict of the reward model, built on `meta` (no memory)."""
    from megatron_polar.model.config import ModelRunConfig, build_transformer_config
    from megatron_polar.model.reward_model import PolarRewardModel
    from megatron_polar.model.spec import build_layer_spec

    run = ModelRunConfig(use_transformer_engine=False)
    config = build_transformer_config(preset, run, use_te=False)
    config.perform_initialization = False
    groups = single_process_groups()  # before `meta`: it may switch on the CPU backend's mode
    with torch.device("meta"):
        model = PolarRewardModel(config, build_layer_spec(False), preset, pg_collection=groups)
    return model.sharded_state_dict(metadata=dict(SHARDED_METADATA))


def single_process_groups():
    """Process groups for converting in this process: megatron's, if this process already has
    them at TP=PP=1 (e.g. inside a test session), else a fresh group of one. Conversion is a
    one-process job; under torchrun, run it on one rank in a subprocess."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.runtime.parallel import initialize_parallel

    if not parallel_state.model_parallel_is_initialized():
        return initialize_parallel(ModelRunConfig(use_transformer_engine=False)).pg
    pg = ProcessGroupCollection.use_mpu_process_groups()
    if pg.tp.size() != 1 or pg.pp.size() != 1 or torch.distributed.get_world_size() != 1:
        raise RuntimeError("HF conversion runs in a single process (world size 1); this process "
                           "is part of a larger group")
    return pg


def group_units(plan: list[Unit], bytes_per_element: int, part_bytes: int) -> list[list[Unit]]:
    """Consecutive units in parts of at most `part_bytes` (a unit is never split)."""
    parts: list[list[Unit]] = [[]]
    size = 0
    for unit in plan:
        n = unit.numel() * bytes_per_element
        if parts[-1] and size + n > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(unit)
        size += n
    return parts


@dataclass
class _Source:
    """An HF directory read and checked against the checkpoint to write."""

    hf_dir: Path
    config: dict
    layout: str
    preset: ModelPreset
    reader: HFWeightReader
    head: str
    reward: bool  # the weights have a reward head (else it starts at zero)
    plan: list[Unit]
    dropped: list[str]
    tokenizer: Optional[Path]


def _read_source(hf_dir: Path, tensor_parallel: int, pipeline_parallel: int,
                 reward_token_id: Optional[int], preset_name: Optional[str],
                 tokenizer: Optional[str | Path]) -> _Source:
    config_path = str(hf_dir / "config.json")
    config = read_hf_config(hf_dir)
    layout = hf_layout(config, config_path)
    preset = preset_from_hf_config(config, config_path, reward_token_id)
    if preset_name:
        given = get_preset(preset_name)
        check_same_shape(preset, given, config_path)
        preset = preset.replace(name=given.name)
    check_layout(preset, tensor_parallel, pipeline_parallel, config_path)
    reader = HFWeightReader(hf_dir)
    head = head_name(layout)
    reward = head in reader
    if is_reward_config(config) and not reward:
        raise ConversionError(f"{config_path} declares {config['architectures']} but the "
                              f"weights have no {head}")
    plan = units(preset, layout)
    dropped = check_weights(reader, plan, reward, layout)
    tok_path = Path(tokenizer) if tokenizer else (
        hf_dir if any((hf_dir / n).is_file() for n in ("tokenizer.model", "tokenizer.json"))
        else None)
    if tok_path is not None:
        check_tokenizer(tok_path, preset)
    return _Source(hf_dir, config, layout, preset, reader, head, reward, plan, dropped, tok_path)


def import_hf(hf_dir: str | Path, out: str | Path, *, tensor_parallel: int = 1,
              pipeline_parallel: int = 1, reward_token_id: Optional[int] = None,
              preset_name: Optional[str] = None, tokenizer: Optional[str | Path] = None,
              part_bytes: int = DEFAULT_PART_BYTES) -> ImportReport:
    hf_dir, out = Path(hf_dir), Path(out)
    src = _read_source(hf_dir, tensor_parallel, pipeline_parallel, reward_token_id, preset_name,
                       tokenizer)
    if out.exists():
        raise ConversionError(f"{out} already exists; remove it or choose another --out")
    dtype = src.reader.dtype(src.plan[0].maps[0].hf[0])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts, tensors = _write_parts(src, tmp, dtype, part_bytes)
    write_manifest(tmp, src.preset, src.tokenizer)
    (tmp / WEIGHTS_INDEX).write_text(json.dumps({
        "format": "megatron_polar weights in parts", "version": 1, "parts": parts,
        "dtype": str(dtype).removeprefix("torch."),
        "source": {"hf_dir": str(hf_dir.resolve()),
                   "architectures": src.config.get("architectures"), "layout": src.layout,
                   "reward_head": "kept" if src.reward else "zero"},
        "layout_checked": {"tensor_model_parallel_size": tensor_parallel,
                           "pipeline_model_parallel_size": pipeline_parallel},
    }, indent=2) + "\n")
    (tmp / "hf").mkdir()
    shutil.copy2(hf_dir / "config.json", tmp / "hf" / "config.json")
    copy_remote_code(hf_dir, tmp / "hf")
    tmp.rename(out)
    return ImportReport(out, src.preset, "kept" if src.reward else "zero", len(parts), tensors,
                        src.dropped)


def _write_parts(src: _Source, tmp: Path, dtype: torch.dtype,
                 part_bytes: int) -> tuple[list[dict], int]:
    """The weights as megatron distributed checkpoints of about `part_bytes` each (peak
    memory is one part); returns the parts' index entries and the HF tensors read."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    leaves = {leaf.key: leaf for leaf in nested_values(meta_sharded_state_dict(src.preset))}
    parts, tensors = [], 0
    for k, group in enumerate(group_units(src.plan, dtype.itemsize, part_bytes)):
        state = {}
        for unit in group:
            for m in unit.maps:
                if m.hf == (src.head,) and not src.reward:
                    # A base model has no head: it starts at zero, as the released trainer's does.
                    data = torch.zeros(m.shape, dtype=dtype)
                else:
                    data = m.join([src.reader.get(n) for n in m.hf])
                leaf = leaves[m.megatron]
                leaf.data = data
                if hasattr(leaf, "dtype"):
                    leaf.dtype = data.dtype
                state[m.megatron] = leaf
                tensors += len(m.hf)
            # Extra state of the unit's layers (none is used on CPU; TE keeps FP8 scales there).
            state.update({key: leaf for key, leaf in leaves.items() if key not in state
                          and key.startswith(unit.key_prefixes)})
        part = tmp / f"part_{k:03d}"
        part.mkdir()
        dist_checkpointing.save(state, str(part))
        parts.append({"dir": part.name, "units": [u.name for u in group]})
        for key in list(state):
            leaves.pop(key)
        del state
    if leaves:
        raise AssertionError(f"tensors not assigned to any part: {sorted(leaves)[:5]}")
    return parts, tensors


def main_import(args) -> int:
    try:
        report = import_hf(args.hf, args.out, tensor_parallel=args.tensor_model_parallel_size,
                           pipeline_parallel=args.pipeline_model_parallel_size,
                           reward_token_id=args.reward_token_id, preset_name=args.model_preset,
                           tokenizer=args.tokenizer, part_bytes=int(args.part_size_mb * 2**20))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.line())
    return 0
