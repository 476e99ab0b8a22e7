"""Running the served models on several ranks (TP / PP), driven by rank 0's front ends.

Only rank 0 listens (PyTriton, /pooling). Every model operation it needs (score sequences,
critic values, a critic step, a save) is a megatron collective, so every rank must run it
with the same inputs: rank 0 broadcasts the operation's name and arguments over the world
group, then runs it itself; the other ranks sit in `follow()`, running whatever arrives, until
`stop()`. Inputs are checked on rank 0 before anything is broadcast, so a bad request never
reaches the other ranks. With one process, `run` is a plain call.

One operation at a time (a lock): the front ends call from their own threads, and a collective
interleaved with another would deadlock. The lock also covers the CPU backend's per-thread
device routing (`cpu_backend_thread`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch

from megatron_polar.runtime.cpu_backend import cpu_backend_thread

log = logging.getLogger(__name__)
_STOP = "__stop__"


class Collective:
    def __init__(self):
        self.ops: dict[str, Callable[..., Any]] = {}
        self.lock = threading.Lock()
        dist = torch.distributed
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self.ops[name] = fn

    def run(self, name: str, *args):
        """On rank 0: run operation `name` on every rank; its result on rank 0."""
        with self.lock, cpu_backend_thread():
            if self.world_size > 1:
                torch.distributed.broadcast_object_list([(name, args)], src=0)
            return self.ops[name](*args)

    def follow(self) -> None:
        """On ranks > 0: run rank 0's operations until it stops."""
        while True:
            message = [None]
            torch.distributed.broadcast_object_list(message, src=0)
            name, args = message[0]
            if name == _STOP:
                return
            self.ops[name](*args)

    def stop(self) -> None:
        """On rank 0: release the followers."""
        if self.world_size > 1:
            with self.lock:
                torch.distributed.broadcast_object_list([(_STOP, ())], src=0)
