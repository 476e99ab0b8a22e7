"""Worker processes for the demo's parallel stages: the policy pool and base LM, and sampling.

The demo's models are tiny, so torch's intra-op threads buy little: on 2 cores, two
single-threaded processes each training or sampling a policy get through ~1.25-1.35x the work
of one process with two threads, and they do not slow to a crawl when other processes want the
cores too (two threads spin-wait for each other when one is descheduled). Each job is seeded by
itself, and every worker runs the same number of threads, so a result does not depend on how
many workers there are or which one ran the job.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

_PROGRESS = None  # the worker's end of the progress queue


def _init_worker(threads: int, progress_queue) -> None:
    global _PROGRESS
    import warnings

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads)
    _PROGRESS = progress_queue


def report(n: int = 1) -> None:
    """Progress from inside a job (nothing outside a worker)."""
    if _PROGRESS is not None:
        _PROGRESS.put(n)


def _drain(q, progress: Optional[Callable[[int], None]]) -> None:
    while True:
        try:
            n = q.get_nowait()
        except queue_module.Empty:
            return
        if progress is not None:
            progress(n)


def run_jobs(jobs: list[tuple[Callable, tuple]], workers: int, threads: int,
             progress: Optional[Callable[[int], None]] = None) -> list:
    """Run `fn(*args)` for every (fn, args) in `workers` spawned processes with `threads`
    torch threads each (jobs are taken in order, so list the long ones first); `progress(n)`
    receives what the jobs `report`. Returns the results in job order; the first error stops
    the others and is raised."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    pool = ProcessPoolExecutor(max(1, min(workers, len(jobs))), mp_context=ctx,
                               initializer=_init_worker, initargs=(threads, q))
    try:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            _drain(q, progress)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
        _drain(q, progress)
        return [f.result() for f in futures]
    except BaseException:
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- jobs --------------------------------------------------------------------------------------

def train_run_job(run, corpus_dir: str, tokenizer_dir: str, out_dir: str) -> list[str]:
    """Train one policy run (policies.py) on the corpus; returns its checkpoint directories."""
    from transformers.utils import logging as hf_logging

    from megatron_polar.demo.corpus import read_corpus
    from megatron_polar.demo.policies import train_policy_run

    hf_logging.disable_progress_bar()
    corpora = {k: read_corpus(Path(corpus_dir) / f"{k}.jsonl") for k in run.mix}
    return [str(p) for p in train_policy_run(run, corpora, Path(tokenizer_dir), Path(out_dir),
                                             report)]


def sample_job(config: dict, shards: list[int]) -> dict:
    """`run_sampling` (tools/sample_trajectories.py's library) for the given shards, as a
    sampling array task would; returns the summaries' sums."""
    from transformers.utils import logging as hf_logging

    from megatron_polar.generation.sampler import SamplingConfig, run_sampling

    hf_logging.disable_progress_bar()
    total: dict = {}
    for shard in shards:
        summary = asdict(run_sampling(SamplingConfig(**config, shard_index=shard),
                                      progress=report))
        for k, v in summary.items():
            if isinstance(v, dict):
                total[k] = {n: total.get(k, {}).get(n, 0) + c for n, c in v.items()}
            else:
                total[k] = total.get(k, 0) + v
    return total
