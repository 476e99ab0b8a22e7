"""megatron-core checkpoint (any TP/PP, weights or training) -> HF `InternLM2ForRewardModel`.

Reads one layer at a time: megatron's `load_tensors_metadata` gives each tensor's global shape,
and `dist_checkpointing.load` of a few global-shaped `ShardedTensor`s assembles them from however
many TP/PP shards wrote them. Writes safetensors shards of at most `--max-shard-size` with an
index, `config.json` in the released layout, the tokenizer files and the remote-code `.py` files
kept at import. Output goes to `OUT.tmp`, renamed to `OUT` when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_polar.convert.hf_config import DTYPES, ConversionError, reward_model_config
from megatron_polar.convert.hf_files import SafetensorsShardWriter, copy_remote_code
from megatron_polar.convert.importer import check_tokenizer, single_process_groups
from megatron_polar.convert.layout import units
from megatron_polar.data.tokenizer import copy_tokenizer
from megatron_polar.model.presets import ModelPreset, checkpoint_preset, get_preset



@dataclass
class ExportReport:
    out: Path
    files: list[Path]
    tensors: int
    total_bytes: int

    def line(self) -> str:
        return (f"exported {self.tensors} tensors ({self.total_bytes / 2**20:.1f} MiB) in "
                f"{len(self.files)} safetensors file(s) to {self.out}")


class CheckpointTensors:
    """Global tensors of a checkpoint by key, loaded a few at a time."""

    def __init__(self, directory: Path):
        from megatron.core import dist_checkpointing

        from megatron_polar.training.checkpointing import weight_parts

        self.where: dict[str, Path] = {}
        self.meta = {}
        for part in weight_parts(directory):
            for key, sh in dist_checkpointing.load_tensors_metadata(str(part)).items():
                self.where[key], self.meta[key] = part, sh

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        missing = [k for k in keys if k not in self.meta]
        if missing:
            raise ConversionError(f"checkpoint has no tensor {missing[0]}")
        out = {}
        for part in dict.fromkeys(self.where[k] for k in keys):
            request = {k: ShardedTensor.from_rank_offsets(
                k, torch.empty(self.meta[k].global_shape, dtype=self.meta[k].dtype), replica_id=0)
                for k in keys if self.where[k] == part}
            out.update(dist_checkpointing.load(request, str(part)))
        return out


def _checkpoint_dir_and_preset(ckpt: Path, preset_name: Optional[str]) -> tuple[Path, ModelPreset]:
    from megatron_polar.training.checkpointing import CheckpointError, resolve_checkpoint_dir

    try:
        directory = resolve_checkpoint_dir(ckpt)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    recorded = checkpoint_preset(directory) or checkpoint_preset(ckpt)
    if preset_name:
        given = get_preset(preset_name)
        if recorded is not None and recorded.differences(given):
            raise ConversionError(f"{directory} was saved with preset {recorded.name}, not "
                                  f"{given.name}")
        return directory, given
    if recorded is None:
        raise ConversionError(f"{directory} records no model preset (model.json); pass "
                              "--model-preset")
    return directory, recorded


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str = "bf16",
              tokenizer: Optional[str | Path] = None, preset_name: Optional[str] = None,
              max_shard_bytes: int = 5 * 10**9) -> ExportReport:
    ckpt, out = Path(ckpt), Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    directory, preset = _checkpoint_dir_and_preset(ckpt, preset_name)
    imported = directory / "hf"
    tok = Path(tokenizer) if tokenizer else next(
        (d / "tokenizer" for d in (directory, ckpt) if (d / "tokenizer").is_dir()), None)
    if tok is None:
        raise ConversionError(f"{directory} carries no tokenizer; pass --tokenizer (the one the "
                              "model was trained with)")
    check_tokenizer(tok, preset)
    if out.exists():
        raise ConversionError(f"{out} already exists; remove it or choose another --out")

    single_process_groups()  # dist_checkpointing.load needs a process group
    tensors = CheckpointTensors(directory)
    for unit in units(preset):
        for m in unit.maps:
            if m.megatron not in tensors.meta:
                raise ConversionError(f"{directory}: no tensor {m.megatron}")
            if tuple(tensors.meta[m.megatron].global_shape) != m.shape:
                raise ConversionError(f"{directory}: tensor {m.megatron} has shape "
                                      f"{list(tensors.meta[m.megatron].global_shape)}, preset "
                                      f"{preset.name} implies {list(m.shape)}")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = SafetensorsShardWriter(tmp, max_shard_bytes)
    count = 0
    for unit in units(preset):
        loaded = tensors.load([m.megatron for m in unit.maps])
        for m in unit.maps:
            data = loaded.pop(m.megatron).to(DTYPES[dtype])
            for name, piece in zip(m.hf, torch.split(data, [s[0] for s in m.hf_shapes])):
                writer.add(name, piece.clone())
                count += 1
        del loaded
    files = writer.close()
    carried = json.loads((imported / "config.json").read_text()) if (
        imported / "config.json").is_file() else None
    (tmp / "config.json").write_text(
        json.dumps(reward_model_config(preset, dtype, carried), indent=2) + "\n")
    copy_tokenizer(tok, tmp)
    if imported.is_dir():  # remote code (configuration_/modeling_internlm2.py) kept at import
        copy_remote_code(imported, tmp)
    tmp.rename(out)
    return ExportReport(out, [out / f.name for f in files], count, writer.total_bytes)


def main_export(args) -> int:
    try:
        report = export_hf(args.ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                           preset_name=args.model_preset,
                           max_shard_bytes=int(args.max_shard_size_mb * 2**20))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.line())
    return 0
