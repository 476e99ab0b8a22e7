"""Model weights as megatron-core distributed checkpoints (loadable at any TP/PP).

Each virtual-stage chunk contributes its own sharded state dict; the tensors inside are stored
under their global names (TransformerBlock numbers layers globally), so the files are the same
whatever TP/PP/VPP layout wrote them.
Writes go to a temporary directory renamed into place once every rank has finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing


def model_sharded_state_dict(chunks) -> dict:
    from megatron_polar.training.step import unwrap

    return {f"model{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_model_weights(chunks, directory: str | os.PathLike) -> Path:
    """Save the model (all ranks call this). The directory appears only when complete."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def load_model_weights(chunks, directory: str | os.PathLike) -> None:
    """Load weights saved by `save_model_weights` at any TP/PP into these chunks."""
    from megatron_polar.training.step import unwrap

    directory = Path(directory)
    if not (directory / "metadata.json").exists():
        raise FileNotFoundError(f"{directory} is not a megatron distributed checkpoint "
                                "(no metadata.json)")
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(directory))
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
