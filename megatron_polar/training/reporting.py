"""Where training figures go: stdout, a JSON-lines file, TensorBoard, Weights & Biases.

Only global rank 0 writes; the figures it gets are already reduced over the whole job
(pair metrics over data-parallel ranks and broadcast from the last pipeline stage, tokens and
FLOPs summed over data-parallel ranks).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import psutil
import torch

from megatron_polar.config.flags import ConfigError
from megatron_polar.runtime.device import on_gpu


def memory_gib() -> dict:
    """Peak GPU memory of this process, or its resident memory on CPU."""
    if on_gpu():
        return {"mem_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    return {"mem_rss_gib": psutil.Process().memory_info().rss / 2**30}


def sink_modules(tensorboard_dir: Optional[str], wandb_project: Optional[str]) -> dict:
    """The packages the asked-for sinks need, imported; ConfigError naming the flag when one is
    missing. The trainer calls it on every rank before starting, so that all ranks stop alike
    (only rank 0 writes)."""
    modules = {}
    if tensorboard_dir:
        try:
            from torch.utils import tensorboard
        except ImportError:
            raise ConfigError("--tensorboard-dir needs the tensorboard package "
                              "(pip install tensorboard)") from None
        modules["tensorboard"] = tensorboard
    if wandb_project:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb-project needs the wandb package (pip install wandb)") \
                from None
        modules["wandb"] = wandb
    return modules


class Reporter:
    def __init__(self, rank: int, log_json: Optional[str] = None,
                 tensorboard_dir: Optional[str] = None, wandb_project: Optional[str] = None,
                 wandb_name: Optional[str] = None, config: Optional[dict] = None):
        self.active = rank == 0
        self.json_file = self.tb = self.wandb = None
        if not self.active:
            return
        if log_json:
            os.makedirs(os.path.dirname(os.path.abspath(log_json)), exist_ok=True)
            self.json_file = open(log_json, "a", buffering=1)
        if tensorboard_dir:
            self.tb = sink_modules(tensorboard_dir, None)["tensorboard"].SummaryWriter(
                tensorboard_dir)
        if wandb_project:
            self.wandb = sink_modules(None, wandb_project)["wandb"].init(
                project=wandb_project, name=wandb_name, config=config)

    def print(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def log(self, kind: str, iteration: int, figures: dict, text: str) -> None:
        """One record: `kind` is "train" or "valid"."""
        if not self.active:
            return
        print(text, flush=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in figures.items()}
        if self.json_file:
            self.json_file.write(json.dumps({"kind": kind, "iteration": iteration, **clean}) + "\n")
        numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb:
            for k, v in numeric.items():
                self.tb.add_scalar(f"{kind}/{k}", v, iteration)
            self.tb.flush()
        if self.wandb:
            self.wandb.log({f"{kind}/{k}": v for k, v in numeric.items()}, step=iteration)

    def close(self) -> None:
        if self.json_file:
            self.json_file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
