"""The sampling run: every selected (policy, shard) pair, resumable, one JSONL file per pair.

Prompt i belongs to shard i % num_shards. A policy gets the corpus prompts of its shard, and
the instruction prompts too if it is a chat model. Those prompts, in prompt-set order, are cut
into fixed batches of `batch_size`; batch k is generated with a torch seed derived from (seed,
policy, shard, k), so it yields the same trajectories whenever it is (re)run.

A shard is written to `<shard>.jsonl.partial`, one batch at a time (appended, flushed,
fsynced). A restarted run drops a torn last line, skips the batches whose records are all
there, re-runs a batch that was cut short and appends only its missing records: the file ends
up byte-identical to an uninterrupted run's. A finished shard is renamed to `<shard>.jsonl`
(dropping trajectories with no text, which the triplet build would reject), so readers of
`*.jsonl` never see a partial shard, and later runs skip it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_polar.data.records import atomic_file
from megatron_polar.generation.backends import SamplingParams, load_backend, resolve_backend
from megatron_polar.generation.pool import Policy, read_pool, resolve_kind, select_policies
from megatron_polar.generation.prompts import (Prompt, PromptSettings, encode_prompt,
                                               load_or_build_prompts)
from megatron_polar.generation.truncation import truncate

EXIT_CODE_INJECTED_CRASH = 3


class SamplingError(RuntimeError):
    pass


@dataclass
class SamplingConfig:
    policies: str                       # policy pool file (pool.py)
    output: str                         # OUTPUT directory
    # prompts (prompts.py)
    corpus: tuple[str, ...] = ()
    corpus_field: str = "text"
    num_prompts: Optional[int] = None
    min_prefix_tokens: int = 1
    max_prefix_tokens: int = 1024
    prefix_tokenizer: Optional[str] = None  # default: the pool's first policy
    instructions: tuple[str, ...] = ()
    num_instructions: Optional[int] = None  # default: all
    # sampling (paper, appendix A.1)
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 4096
    samples_per_prompt: int = 2  # POLAR needs two per policy: reference and positive
    seed: int = 1234
    # work selection
    num_shards: int = 1
    shard_index: Optional[int] = None   # None: every shard
    policy: tuple[str, ...] = ()        # names or 0-based indices; empty: every policy
    # engine
    backend: str = "auto"
    batch_size: int = 8                 # prompts per generate call
    dtype: str = "auto"
    tensor_parallel_size: int = 1       # vLLM only
    gpu_memory_utilization: float = 0.9  # vLLM only
    exit_after_batches: Optional[int] = None  # fault injection: os._exit after N batches
    prompts_only: bool = False          # write OUTPUT/prompts.jsonl and stop

    def __post_init__(self):
        self.corpus, self.instructions, self.policy = (
            tuple(self.corpus), tuple(self.instructions), tuple(str(p) for p in self.policy))
        checks = [
            (self.temperature > 0, "temperature must be > 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0: no top-k)"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.samples_per_prompt >= 1, "samples_per_prompt must be >= 1"),
            (self.num_shards >= 1, "num_shards must be >= 1"),
            (self.shard_index is None or 0 <= self.shard_index < self.num_shards,
             "shard_index must be in [0, num_shards)"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (1 <= self.min_prefix_tokens <= self.max_prefix_tokens,
             "need 1 <= min_prefix_tokens <= max_prefix_tokens"),
            (self.exit_after_batches is None or self.exit_after_batches >= 1,
             "exit_after_batches must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def prompt_settings(self, pool: list[Policy]) -> PromptSettings:
        # Absolute paths: array tasks started from other directories agree on the settings.
        return PromptSettings(
            corpus=tuple(map(os.path.abspath, self.corpus)), corpus_field=self.corpus_field,
            num_prompts=self.num_prompts, min_prefix_tokens=self.min_prefix_tokens,
            max_prefix_tokens=self.max_prefix_tokens,
            prefix_tokenizer=os.path.abspath(self.prefix_tokenizer or pool[0].path),
            instructions=tuple(map(os.path.abspath, self.instructions)),
            num_instructions=self.num_instructions, seed=self.seed)

    def sampling_record(self, backend: str) -> dict:
        """The `sampling` field of every record: what produced it, and everything that must
        not change between a shard's interrupted run and its resumption."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "backend": backend,
                "samples_per_prompt": self.samples_per_prompt, "batch_size": self.batch_size,
                "dtype": self.dtype}


@dataclass
class SamplingSummary:
    written: int = 0   # trajectories generated and written by this run
    skipped: int = 0   # trajectories already on disk (finished shards, resumed partial ones)
    empty: int = 0     # trajectories without text, left out of finished shards
    truncated: dict = field(default_factory=lambda: {"loop": 0, "tail": 0})
    tokens: int = 0    # generated tokens of the written trajectories (before truncation)
    shards_finished: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.written:,} trajectories written, {self.skipped:,} already done, "
                f"{self.empty:,} empty left out; truncated: {self.truncated['loop']:,} loops, "
                f"{self.truncated['tail']:,} tails; {self.tokens:,} tokens generated; "
                f"{self.shards_finished} shard(s) finished in {self.seconds:.1f}s")


def shard_path(output: str, policy: str, index: int, count: int) -> Path:
    return Path(output) / policy / f"shard-{index:05d}-of-{count:05d}.jsonl"


def _seed(*parts) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: torch.manual_seed range


def _check_sampling(record: dict, want: dict, where: str):
    have = record.get("sampling")
    if have != want:
        diff = ", ".join(f"{k}: {(have or {}).get(k)!r} there, {want[k]!r} now"
                         for k in want if (have or {}).get(k) != want[k])
        raise SamplingError(f"{where}: written with other sampling settings ({diff}); use the "
                            "same settings or another --output")


def _resume(partial: Path, sampling: dict) -> set[tuple[str, int]]:
    """(prompt_id, sample_index) of the records already in a partial shard. A torn last line
    (a crash mid-write) is cut off the file so that appending continues on a line boundary."""
    if not partial.is_file():
        return set()
    data = partial.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(partial, "r+b") as f:
            f.truncate(end)
    done = set()
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SamplingError(f"{partial}:{number}: corrupt record; delete the file to sample "
                                "this shard again") from None
        if number == 1:
            _check_sampling(record, sampling, str(partial))
        done.add((record["prompt_id"], record["sample_index"]))
    return done


def _finish(partial: Path, final: Path, summary: SamplingSummary):
    """Publish a complete shard under its final name, without empty trajectories."""
    with open(partial, "rb") as src, atomic_file(final) as dst:
        for line in src:
            if json.loads(line)["trajectory"].strip():
                dst.write(line)
            else:
                summary.empty += 1
    partial.unlink()
    summary.shards_finished += 1


def continuation_decoder(tokenizer, prompt_ids: list[int]) -> Callable[[list[int]], str]:
    """Text of generated ids as a continuation of the prompt. Decoding them alone would lose
    a leading space with sentencepiece-style tokenizers (their decoders strip the first
    token's space), and corpus prompts are joined to their continuations with nothing in
    between; so decode prompt + continuation and drop the prompt's text."""
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)

    def decode(ids) -> str:
        text = tokenizer.decode(list(prompt_ids) + list(ids), skip_special_tokens=True)
        if text.startswith(head):
            return text[len(head):]
        return tokenizer.decode(list(ids), skip_special_tokens=True)  # unusual normalisers

    return decode


def _finished_shard(final: Path, sampling: dict) -> int:
    """Records in a finished shard, after checking it was sampled with these settings."""
    with open(final, "rb") as f:
        first = f.readline()
        count = 1 + sum(1 for _ in f) if first else 0
    if first:
        _check_sampling(json.loads(first), sampling, str(final))
    return count


class _Run:
    def __init__(self, cfg: SamplingConfig, sampling: dict, progress):
        self.cfg, self.sampling, self.progress = cfg, sampling, progress
        self.summary = SamplingSummary()
        self.batches = 0
        self.params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens)

    def record(self, prompt: Prompt, policy: str, index: int, generation, decode) -> dict:
        cut = truncate(generation.ids, generation.stopped, decode)
        if cut.kind:
            self.summary.truncated[cut.kind] += 1
        self.summary.tokens += len(generation.ids)
        return {"prompt_id": prompt.prompt_id, "prompt": prompt.prompt, "policy": policy,
                "trajectory": cut.text, "sample_index": index, "kind": prompt.kind,
                # Corpus continuations are plain concatenations, answers follow a chat turn.
                "wrapper": "pretrain" if prompt.kind == "corpus" else "sft",
                "finish_reason": "stop" if generation.stopped else "length",
                "truncation": cut.kind, "new_tokens": len(generation.ids),
                "sampling": self.sampling}

    def shard(self, policy: Policy, kind: str, backend, prompts: list[tuple[int, Prompt]],
              shard: int):
        cfg, n = self.cfg, self.cfg.samples_per_prompt
        final = shard_path(cfg.output, policy.name, shard, cfg.num_shards)
        partial = final.with_name(final.name + ".partial")
        final.parent.mkdir(parents=True, exist_ok=True)
        mine = [p for i, p in prompts if i % cfg.num_shards == shard
                and (p.kind == "corpus" or kind == "chat")]
        done = _resume(partial, self.sampling)
        tok = backend.tokenizer
        with open(partial, "ab") as out:
            for k in range(0, len(mine), cfg.batch_size):
                batch = mine[k:k + cfg.batch_size]
                present = sum((p.prompt_id, s) in done for p in batch for s in range(n))
                self.summary.skipped += present
                if present == len(batch) * n:
                    continue
                inputs = [encode_prompt(tok, p) for p in batch]
                generations = backend.generate(
                    inputs, n, self.params,
                    seed=_seed(cfg.seed, policy.name, f"{shard}-of-{cfg.num_shards}",
                               k // cfg.batch_size),
                    request_seeds=[_seed(cfg.seed, policy.name, p.prompt_id) % (2**31 - 1)
                                   for p in batch])
                lines = []
                for p, ids, samples in zip(batch, inputs, generations):
                    decode = continuation_decoder(tok, ids)
                    lines += [json.dumps(self.record(p, policy.name, s, g, decode),
                                         ensure_ascii=False).encode() + b"\n"
                              for s, g in enumerate(samples) if (p.prompt_id, s) not in done]
                out.write(b"".join(lines))
                out.flush()
                os.fsync(out.fileno())
                self.summary.written += len(lines)
                if self.progress is not None:
                    self.progress(len(lines))
                self.batches += 1
                if cfg.exit_after_batches and self.batches >= cfg.exit_after_batches:
                    os._exit(EXIT_CODE_INJECTED_CRASH)  # no clean-up, as in a crash
        _finish(partial, final, self.summary)


def run_sampling(cfg: SamplingConfig,
                 progress: Optional[Callable[[int], None]] = None) -> SamplingSummary:
    """Sample every selected (policy, shard) not finished yet; `progress(n)` is called with
    the number of trajectories each batch adds. Raises PoolError, PromptError, BackendError
    or SamplingError (all ValueError/RuntimeError) with messages for the user."""
    start = time.perf_counter()
    pool = read_pool(cfg.policies)
    policies = select_policies(pool, cfg.policy)
    shards = range(cfg.num_shards) if cfg.shard_index is None else [cfg.shard_index]
    run = _Run(cfg, cfg.sampling_record(resolve_backend(cfg.backend)), progress)
    # Only this run's shards are held in memory: the prompt set may have millions of prompts.
    prompts = load_or_build_prompts(cfg.output, cfg.prompt_settings(pool), _load_tokenizer,
                                    select=lambda i: i % cfg.num_shards in shards)

    for policy in [] if cfg.prompts_only else policies:
        todo = []
        for shard in shards:
            final = shard_path(cfg.output, policy.name, shard, cfg.num_shards)
            if final.is_file():
                run.summary.skipped += _finished_shard(final, run.sampling)
                final.with_name(final.name + ".partial").unlink(missing_ok=True)
            else:
                todo.append(shard)
        if not todo:
            continue  # nothing to do: do not even load the model
        backend = load_backend(cfg.backend, policy.path, cfg.dtype, cfg.seed,
                               cfg.tensor_parallel_size, cfg.gpu_memory_utilization)
        kind = resolve_kind(policy, backend.tokenizer)
        for shard in todo:
            run.shard(policy, kind, backend, prompts, shard)
        del backend
        _release_memory()

    run.summary.seconds = time.perf_counter() - start
    return run.summary


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _release_memory():
    """Free one policy's weights before loading the next."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
