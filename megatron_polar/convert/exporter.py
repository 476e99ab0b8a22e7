"""megatron-core checkpoint (any TP/PP, weights or training) -> an HF reward-model directory.

Two layouts (`--format`):
- `internlm2` (default): `InternLM2ForRewardModel`, the released POLAR layout, loaded through
  remote code (`auto_map`); the released `configuration_/modeling_internlm2.py` are shipped in
  it whenever they can be had (remote_code.py), else the report carries a warning;
- `llama-seqcls`: `LlamaForSequenceClassification` with one label, the same network under
  Llama's names, which consumers build natively (no remote code, no `auto_map`).

Reads one layer at a time: megatron's `load_tensors_metadata` gives each tensor's global shape,
and `dist_checkpointing.load` of a few global-shaped `ShardedTensor`s assembles them from however
many TP/PP shards wrote them. Writes safetensors shards of at most `--max-shard-size` with an
index, `config.json`, the tokenizer files and, for `internlm2`, the remote code. Output goes to
`OUT.tmp`, renamed to `OUT` when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_polar.convert.hf_config import (DTYPES, ConversionError, llama_seqcls_config,
                                              reward_model_config)
from megatron_polar.convert.hf_files import SafetensorsShardWriter
from megatron_polar.convert.importer import check_tokenizer, single_process_groups
from megatron_polar.convert.layout import INTERNLM2, LAYOUTS, LLAMA_SEQCLS, units
from megatron_polar.convert.remote_code import (find_reward_remote_code,
                                                missing_remote_code_warning, ship_remote_code)
from megatron_polar.data.tokenizer import copy_tokenizer
from megatron_polar.model.presets import ModelPreset

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    out: Path
    files: list[Path]
    tensors: int
    total_bytes: int
    layout: str = INTERNLM2
    remote_code: Optional[str] = None  # where the shipped remote code came from, if any
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"exported {self.tensors} tensors ({self.total_bytes / 2**20:.1f} MiB) in "
                f"{len(self.files)} safetensors file(s) to {self.out} ({self.layout} layout"
                + (f"; remote code: {self.remote_code}" if self.remote_code else "") + ")")


class CheckpointTensors:
    """Global tensors of a checkpoint by key, loaded a few at a time."""

    def __init__(self, directory: Path):
        from megatron.core import dist_checkpointing

        from megatron_polar.runtime.checkpoints import weight_parts

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


def read_checkpoint(ckpt: Path, preset_name: Optional[str],
                    tokenizer: Optional[str | Path]) -> tuple[Path, ModelPreset, Path]:
    """The dist checkpoint, its preset and its tokenizer, by the manifest's rules
    (runtime/checkpoints.py)."""
    from megatron_polar.runtime.checkpoints import CheckpointError, read_manifest

    try:
        manifest = read_manifest(ckpt)
        return (manifest.directory, manifest.preset_for(preset_name),
                manifest.tokenizer_for(tokenizer))
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def check_pad_token(preset: ModelPreset, tokenizer: Path) -> None:
    """For `llama-seqcls`: the pad id must be no id that every POLAR sequence holds.

    LlamaForSequenceClassification scores the last token that is not `pad_token_id`
    (transformers 5: rightmost non-pad; 4.48: the one before the first pad). A POLAR sequence
    is `[BOS] ... <|reward|> ... [REWARD]`: were pad the reward token, the score would be read
    elsewhere under either rule; were it BOS or the separator, the first-pad rule would read it
    mid-sequence. Other text ids can equal the pad id only when the tokenizer emits it from text,
    which a sentencepiece model never does for its EOS control token (InternLM2's pad id, 2)."""
    from megatron_polar.data.tokenizer import PolarTokenizer

    tok = PolarTokenizer(tokenizer, reward_token_id=preset.reward_token_id)
    for what, token in (("reward token", preset.reward_token_id),
                        ("<|reward|> separator", tok.separator_id), ("BOS", tok.bos_id)):
        if preset.pad_token_id == token:
            raise ConversionError(
                f"pad_token_id {token} is the {what} id, which every POLAR sequence holds; "
                "LlamaForSequenceClassification reads the reward at the last token that is not "
                "pad_token_id, so the pad id must be one POLAR sequences never contain "
                "(InternLM2's EOS, 2). Set pad_token_id in the checkpoint's model.json")


def export_hf(ckpt: str | Path, out: str | Path, *, dtype: str = "bf16",
              tokenizer: Optional[str | Path] = None, preset_name: Optional[str] = None,
              max_shard_bytes: int = 5 * 10**9, layout: str = INTERNLM2) -> ExportReport:
    ckpt, out = Path(ckpt), Path(out)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ConversionError(f"--format must be one of {list(LAYOUTS)}, got {layout!r}")
    directory, preset, tok = read_checkpoint(ckpt, preset_name, tokenizer)
    imported = directory / "hf"
    check_tokenizer(tok, preset)
    if layout == LLAMA_SEQCLS:
        check_pad_token(preset, tok)
    if out.exists():
        raise ConversionError(f"{out} already exists; remove it or choose another --out")

    single_process_groups()  # dist_checkpointing.load needs a process group
    tensors = CheckpointTensors(directory)
    plan = units(preset, layout)
    _check_tensors(directory, tensors, plan, preset)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = SafetensorsShardWriter(tmp, max_shard_bytes)
    count = 0
    for unit in plan:
        loaded = tensors.load([m.megatron for m in unit.maps])
        for m in unit.maps:
            data = loaded.pop(m.megatron).to(DTYPES[dtype])
            for name, piece in zip(m.hf, m.split(data)):
                writer.add(name, piece.clone())
                count += 1
        del loaded
    files = writer.close()
    copy_tokenizer(tok, tmp)
    config, origin, warnings = _config_and_code(layout, preset, dtype, imported, tmp, out)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tmp.rename(out)
    for message in warnings:
        logger.warning(message)
    return ExportReport(out, [out / f.name for f in files], count, writer.total_bytes, layout,
                        origin, warnings)


def _check_tensors(directory: Path, tensors: "CheckpointTensors", plan, preset) -> None:
    """Every tensor the layout reads is in the checkpoint, with the preset's shape."""
    for unit in plan:
        for m in unit.maps:
            if m.megatron not in tensors.meta:
                raise ConversionError(f"{directory}: no tensor {m.megatron}")
            if tuple(tensors.meta[m.megatron].global_shape) != m.shape:
                raise ConversionError(f"{directory}: tensor {m.megatron} has shape "
                                      f"{list(tensors.meta[m.megatron].global_shape)}, preset "
                                      f"{preset.name} implies {list(m.shape)}")


def _config_and_code(layout: str, preset, dtype: str, imported: Path, tmp: Path,
                     out: Path) -> tuple[dict, Optional[str], list[str]]:
    """The export's config.json, with the remote code shipped beside it (InternLM2 layout):
    (config, where the remote code came from, warnings)."""
    if layout != INTERNLM2:
        return llama_seqcls_config(preset, dtype), None, _remote_tokenizer_warnings(tmp, out)
    carried = _imported_config(imported)
    config = reward_model_config(preset, dtype, carried if carried and carried.get(
        "model_type") == "internlm2" else None)
    source = imported if imported.is_dir() else None
    code = find_reward_remote_code(source)
    ship_remote_code(code, source, tmp)
    if code is None:
        return config, None, [missing_remote_code_warning(out)]
    return config, code.describe(), []


def _imported_config(imported: Path) -> Optional[dict]:
    path = imported / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _remote_tokenizer_warnings(tmp: Path, out: Path) -> list[str]:
    """A Llama-layout model needs no remote code, but a shipped tokenizer_config.json may still
    name some (InternLM2's `tokenization_internlm2.py`): say so rather than imply otherwise."""
    path = tmp / "tokenizer_config.json"
    try:
        auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
    except json.JSONDecodeError:
        return [f"{out}/tokenizer_config.json is not valid JSON"]
    if not auto_map:
        return []
    return [f"{out}/tokenizer_config.json names remote tokenizer code ({auto_map}): the model "
            "loads without trust_remote_code, but AutoTokenizer needs it for this tokenizer; "
            "give consumers token ids (POLAR sequences are built by our encoder anyway) or "
            "allow remote code for the tokenizer"]


class _StderrWarnings(logging.Handler):
    """`warning: ...` lines on the current sys.stderr (looked up when a record comes)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {self.format(record)}", file=sys.stderr)


@contextlib.contextmanager
def _warnings_on_stderr():
    """While the CLI runs, this module's logged warnings go to stderr, once: through our
    handler, not also to a root handler (or logging's last-resort one)."""
    handler, propagate = _StderrWarnings(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def main_export(args) -> int:
    try:
        with _warnings_on_stderr():
            report = export_hf(args.ckpt, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                               preset_name=args.model_preset,
                               max_shard_bytes=int(args.max_shard_size_mb * 2**20),
                               layout=args.format)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.line())  # warnings, if any, were logged to stderr as they arose
    return 0
