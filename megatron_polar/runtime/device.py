"""The device of this process: chosen once, at the entry point, and asked for everywhere else.

`select_device()` is called by `initialize_parallel` (every entry point that runs megatron
goes through it): this rank's GPU (`LOCAL_RANK`) when CUDA is available, else the CPU with
the CPU backend switched on (cpu_backend.py). Library code asks `compute_device()` or
`on_gpu()` instead of probing CUDA itself. Asked before any entry point chose (a unit test
calling one component), they answer what the choice would be, without making it (no
`set_device`, no CPU backend).

Hardware checks are not device choices and stay where they are: the layer-spec and FP8
checks of `model/spec.py` (what this GPU supports), `make gpu-check`, and the sampling tools'
own `--device` (they run transformers, not megatron).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_polar.runtime.cpu_backend import enable_cpu_backend

_DEVICE: Optional[torch.device] = None


def select_device() -> torch.device:
    """Choose this process's device (idempotent): `cuda:LOCAL_RANK`, or the CPU backend."""
    global _DEVICE
    if _DEVICE is None:
        if enable_cpu_backend():
            _DEVICE = torch.device("cpu")
        else:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            _DEVICE = torch.device("cuda", torch.cuda.current_device())
    return _DEVICE


def compute_device() -> torch.device:
    """This rank's GPU, or the CPU on a machine without CUDA."""
    if _DEVICE is not None:
        return _DEVICE
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def on_gpu() -> bool:
    """True when this process computes on a GPU."""
    return compute_device().type == "cuda"
