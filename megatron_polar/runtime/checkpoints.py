"""Checkpoint directories as every package reads them: where the weights are, how they load
at any TP/PP, and what the checkpoint says about itself (its manifest).

- Layout (Megatron-LM's): a run directory `SAVE/` with `latest_checkpointed_iteration.txt`
  naming `SAVE/iter_NNNNNNN/`, each a megatron-core distributed checkpoint; or a bare
  checkpoint directory (HF import writes one, in parts listed in `polar_weights.json`).
  `resolve_checkpoint_dir` finds the dist checkpoint, `latest_iteration` reads the marker.
- Weights only: `save_model_weights` / `load_model_weights` (any checkpoint of ours, weights
  or training, whole or in parts). Training state (optimizer, RNG, sampler) is
  training/checkpointing.py's.
- The manifest: `model.json` (the preset, `ModelPreset.as_dict`) and `tokenizer/` (the
  tokenizer the model was trained with) beside the shards. The trainer and HF import write it
  with `write_manifest`; the trainer, the exporter and the scorer read it with
  `read_manifest` and choose the preset with `CheckpointManifest.preset_for`: one set of rules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from megatron.core import dist_checkpointing

from megatron_polar.model.presets import MODEL_FILE, ModelPreset, checkpoint_preset, get_preset
from megatron_polar.runtime.chunks import unwrap

TOKENIZER_DIR = "tokenizer"  # the manifest's tokenizer, beside model.json

LATEST = "latest_checkpointed_iteration.txt"
WEIGHTS_INDEX = "polar_weights.json"  # a weights checkpoint written in parts
# Per-layer checkpoint keys instead of one tensor stacked over layers: megatron-core is moving to
# this layout (it forces it with singleton local shards), and it lets HF import and export write
# and read a checkpoint a few layers at a time.
SHARDED_METADATA = {"non_homogeneous_layers": True}
ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory."""


def model_sharded_state_dict(chunks) -> dict:
    return {f"model{i}": unwrap(chunk).sharded_state_dict(metadata=dict(SHARDED_METADATA))
            for i, chunk in enumerate(chunks)}


def rank() -> int:
    """This process's rank, 0 without torch.distributed."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (a no-op without torch.distributed)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rank 0 moves a finished checkpoint into place (over an older one of the same name)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """True for a checkpoint directory itself (a dist checkpoint or a weights index)."""
    path = Path(path)
    return (path / "metadata.json").is_file() or (path / WEIGHTS_INDEX).is_file()


def weight_parts(directory: Path) -> list[Path]:
    """The dist checkpoints that hold a checkpoint's weights: its parts, or itself."""
    index = Path(directory) / WEIGHTS_INDEX
    if not index.is_file():
        return [Path(directory)]
    try:
        parts = [Path(directory) / p["dir"] for p in json.loads(index.read_text())["parts"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a weights index ({e})") from None
    missing = [str(p) for p in parts if not (p / "metadata.json").is_file()]
    if missing:
        raise CheckpointError(f"{index} lists parts that are missing or incomplete: {missing}")
    return parts


def is_training_checkpoint(directory: Path) -> bool:
    """True for a checkpoint with training state (a trainer's iter_N), False for weights only."""
    if (Path(directory) / WEIGHTS_INDEX).is_file():
        return False
    common = dist_checkpointing.load_common_state_dict(str(directory))
    return isinstance(common, dict) and common.get("common") is not None


# -- weights only ------------------------------------------------------------------------------

def save_model_weights(chunks, directory: str | os.PathLike) -> Path:
    """Save the model (all ranks call this). The directory appears only when complete."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    barrier()
    if rank() == 0:
        replace_dir(tmp, final)
    barrier()
    return final


def resolve_checkpoint_dir(path: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """A dist checkpoint directory from a run directory (its latest, or `iteration`), an
    `iter_N` directory, or a bare checkpoint directory (e.g. written by HF import)."""
    path = Path(path)
    if iteration is not None:
        found = path / f"iter_{iteration:07d}"
    elif (path / LATEST).is_file():
        found = path / f"iter_{int((path / LATEST).read_text().strip()):07d}"
    else:
        found = path
    if not is_checkpoint_dir(found):
        raise CheckpointError(f"{found} is not a megatron distributed checkpoint "
                              "(no metadata.json)")
    return found


def load_model_weights(chunks, directory: str | os.PathLike) -> Path:
    """Load the weights of any checkpoint of ours (weights-only or training, any TP/PP, in parts
    or whole). Module extra state the checkpoint lacks (Transformer Engine's FP8 scales, absent
    from checkpoints written with the local spec) is left as the modules initialised it."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, merge
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    found = resolve_checkpoint_dir(directory)
    state, wanted = {}, _leaf_keys(model_sharded_state_dict(chunks))
    for part in weight_parts(found):  # a fresh sharded state dict each time: loading consumes it
        keys = {v.key for v in load_sharded_metadata(str(part)).values()}
        mine, _ = extract_matching_values(model_sharded_state_dict(chunks),
                                          lambda x: x.key in keys)
        wanted -= keys
        if mine:
            merge(state, dist_checkpointing.load(mine, str(part)))
    missing = sorted(k for k in wanted if not k.endswith("._extra_state"))
    if missing:
        raise CheckpointError(f"{found} has no tensor {missing[0]}"
                              + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for i, chunk in enumerate(chunks):
        result = unwrap(chunk).load_state_dict(state.get(f"model{i}", {}), strict=False)
        bad = [k for k in result.missing_keys if not k.endswith("._extra_state")]
        if bad or result.unexpected_keys:
            raise CheckpointError(f"{found}: weights do not fit the model (missing {bad[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]})")
    return found


def _leaf_keys(sharded: dict) -> set[str]:
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return {leaf.key for leaf in nested_values(sharded)}


def latest_iteration(save_dir: str | os.PathLike) -> Optional[int]:
    """The iteration `latest_checkpointed_iteration.txt` names, if it names a complete one."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{marker}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not is_checkpoint_dir(Path(save_dir) / f"iter_{iteration:07d}"):
        raise CheckpointError(f"{marker} names iteration {iteration}, but "
                              f"{Path(save_dir) / f'iter_{iteration:07d}'} is not a complete "
                              "checkpoint")
    return iteration


# -- the manifest ------------------------------------------------------------------------------

def write_manifest(directory: str | os.PathLike, preset: ModelPreset,
                   tokenizer: Optional[str | os.PathLike] = None) -> None:
    """Write `model.json` and, given a tokenizer (a file or an HF directory), a copy of it as
    `tokenizer/` into a checkpoint directory."""
    from megatron_polar.data.tokenizer import copy_tokenizer

    directory = Path(directory)
    (directory / MODEL_FILE).write_text(json.dumps(preset.as_dict(), indent=2) + "\n")
    if tokenizer:
        copy_tokenizer(tokenizer, directory / TOKENIZER_DIR)


@dataclass(frozen=True)
class CheckpointManifest:
    """What a checkpoint records besides its weights. `path` is what the user named (a run
    directory, an `iter_N` or a bare checkpoint); `directory` the dist checkpoint inside it
    (the latest iteration of a run), or `path` itself when it holds none yet."""

    path: Path
    directory: Path
    preset: Optional[ModelPreset]  # model.json of `directory`, else of `path`
    tokenizer: Optional[Path]      # tokenizer/ of `directory`, else of `path`

    def preset_for(self, name: Optional[str], default: Optional[str] = None) -> ModelPreset:
        """The preset to run: `name` (`--model-preset`: a preset name or a model.json), which
        must agree with the recorded one; else the recorded one; else `default`."""
        if name is not None:
            try:
                given = get_preset(name)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            if self.preset is not None and self.preset.differences(given):
                raise CheckpointError(
                    f"--model-preset {name} does not match the preset recorded in {self.path} "
                    f"({self.preset.name}); leave --model-preset out to use it")
            return given
        if self.preset is not None:
            return self.preset
        if default is not None:
            return get_preset(default)
        raise CheckpointError(f"{self.directory} records no model preset ({MODEL_FILE}); pass "
                              "--model-preset")

    def tokenizer_for(self, given: Optional[str | os.PathLike]) -> Path:
        """`given` (`--tokenizer`), else the recorded tokenizer, else an error."""
        if given:
            if not Path(given).exists():
                raise CheckpointError(f"--tokenizer {given}: no such file or directory")
            return Path(given)
        if self.tokenizer is None:
            raise CheckpointError(f"{self.directory} carries no tokenizer; pass --tokenizer (the "
                                  "one the model was trained with)")
        return self.tokenizer


def read_manifest(path: str | os.PathLike, *, must_exist: bool = True) -> CheckpointManifest:
    """The manifest of `path`. With `must_exist=False` a run directory that holds no
    checkpoint yet (a first `--load`) reads as an empty manifest instead of an error."""
    path = Path(path)
    if must_exist:
        directory = resolve_checkpoint_dir(path)
    else:
        latest = latest_iteration(path) if path.is_dir() else None
        directory = path / f"iter_{latest:07d}" if latest is not None else path
    preset = checkpoint_preset(directory) or checkpoint_preset(path)
    tokenizer = next((d / TOKENIZER_DIR for d in (directory, path)
                      if (d / TOKENIZER_DIR).is_dir()), None)
    return CheckpointManifest(path, directory, preset, tokenizer)
