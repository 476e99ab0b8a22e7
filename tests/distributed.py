"""Run a function in N CPU processes with a gloo process group (multi-process tests)."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from megatron_polar.runtime.parallel import free_port


def _worker(rank, world_size, port, fn, args, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        from megatron_polar.runtime.parallel import destroy_parallel

        destroy_parallel()


def run_distributed(world_size: int, fn, *args, timeout: float = 600) -> None:
    """Spawn `world_size` processes running fn(*args); re-raise the first failure here.

    `fn` must be a module-level function (it is pickled into fresh interpreters).
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if not errors.empty():
        raise AssertionError(errors.get())
    if alive:
        raise AssertionError(f"{len(alive)} ranks timed out after {timeout}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited with codes {bad}")
