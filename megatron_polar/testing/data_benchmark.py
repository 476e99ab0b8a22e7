"""Data-pipeline figures: build throughput, packing efficiency, sampler throughput."""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_polar.data.build import BuildConfig, build_triplets
from megatron_polar.data.dataset import BlendSpec, TripletStream
from megatron_polar.data.sampler import PackingSampler

WORDS = ("the of and to in is was for on that with as by at from his her an were are which "
         "this be or had not but first one all new more when who will about there can time "
         "policy model reward reference answer question because however therefore example "
         "function return value number result equation proof theorem story chapter").split()


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """English-like triplets with POLAR-like proportions (short prompts, longer responses)."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [{"prompt": text(5, 200), "reference": text(20, 600), "chosen": text(20, 600),
             "rejected": text(20, 600)} for _ in range(n)]


def train_tokenizer(directory: Path, vocab_size: int = 4000) -> Path:
    """A sentencepiece model trained on the synthetic words, set up like InternLM2's: identity
    normalisation with whitespace kept, byte fallback (its HF fast converter treats it so:
    Replace(" ", "▁") plus prepend, ByteFallback decoder). Such a model round-trips text, so
    the build takes its fast path (encoding.py) where nothing needs truncation."""
    import io

    import sentencepiece as spm

    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(20000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=vocab_size, hard_vocab_limit=False,
                                   user_defined_symbols=["<|reward|>", "[UNUSED_TOKEN_130]"],
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    path = directory / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def build_throughput(n_records: int, workers: int, workdir: Path, tokenizer: Path) -> dict:
    src = workdir / "input.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(n_records)))
    start = time.perf_counter()
    summary = build_triplets(BuildConfig([str(src)], str(workdir / f"out_w{workers}"),
                                         str(tokenizer), workers=workers), progress=False)
    seconds = time.perf_counter() - start
    return {"workers": workers, "records": summary.written, "output_tokens": summary.tokens,
            "seconds": seconds, "output_tokens_per_s": summary.tokens / seconds,
            "input_mb_per_s": src.stat().st_size / seconds / 1e6}


class LengthOnlyStream:
    """Pair lengths with POLAR's mix: prefix 1..1024, responses 1..4096 tokens, uniform."""

    def __init__(self, seed: int = 0, prefix_max: int = 1024, response_max: int = 4096):
        self.seed, self.prefix_max, self.response_max = seed, prefix_max, response_max
        self._cache: dict[int, int] = {}

    def length(self, position: int) -> int:
        if position not in self._cache:
            rng = np.random.default_rng([self.seed, position])
            p = int(rng.integers(1, self.prefix_max + 1))
            ref, pos, neg = (int(x) for x in rng.integers(1, self.response_max + 1, 3))
            self._cache[position] = (2 * p + ref + pos + 3) + (2 * p + ref + neg + 3)
        return self._cache[position]


def packing_efficiency(budget: int, steps: int = 20, global_batch_size: int = 1940,
                       pad_multiple: int = 128) -> dict:
    """Real tokens / computed tokens when each step's pairs are packed into variable-length
    micro-batches of at most `budget` tokens, each padded to a multiple of `pad_multiple`;
    also how full the budget is, and the padding-to-maximum baseline."""
    logging.getLogger("megatron_polar.data.sampler").setLevel(logging.ERROR)  # counted below
    stream = LengthOnlyStream()
    sampler = PackingSampler(stream, global_batch_size, token_budget=budget)
    real = computed = packs = 0
    for _ in range(steps):
        for pack in sampler.next_step_positions():
            n = sum(stream.length(p) for p in pack)
            real += n
            computed += -(-n // pad_multiple) * pad_multiple
            packs += 1
    # Padding instead: each sequence padded to the longest possible one, no packing.
    longest_seq = 2 * stream.prefix_max + 2 * stream.response_max + 3
    pairs = steps * global_batch_size
    padded = real / (pairs * 2 * longest_seq)
    return {"budget": budget, "packed_efficiency": real / computed,
            "budget_fill": real / (packs * budget), "micro_batches_per_step": packs / steps,
            "padded_efficiency": padded, "skipped_oversize_pairs": sampler.skipped_oversize,
            "pairs": pairs, "global_batch_size": global_batch_size}


def sampler_throughput(prefix: str, budget: int, steps: int = 50,
                       shared_prefix: bool = False) -> dict:
    """Real tokens (the pairs' sequences in full) per second the sampler plans and builds
    into micro-batches; with `shared_prefix` it also reads every pair to find its common
    prefix, the first time the pair is seen."""
    stream = TripletStream(BlendSpec.parse([prefix]))
    sampler = PackingSampler(stream, 64, token_budget=budget, shared_prefix=shared_prefix)
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        tokens += sum(mb.num_sequence_tokens for mb in sampler.next_step())
    seconds = time.perf_counter() - start
    return {"budget": budget, "tokens_per_s": tokens / seconds, "steps": steps,
            "shared_prefix": shared_prefix}


def against_megatron_lm(megatron_lm: Path, n_records: int, workers: int, workdir: Path,
                        tokenizer: Path) -> dict:
    """Wall time, start-up included, of our CLI and of Megatron-LM's `tools/preprocess_data.py`
    (from a checkout given by the user; nothing of it is vendored) on the same records and
    tokenizer. preprocess_data gets each record's four fields joined into one `text`."""
    import subprocess
    import sys

    records = synthetic_records(n_records)
    ours_in = workdir / "input.jsonl"
    if not ours_in.exists():
        ours_in.write_text("".join(json.dumps(r) + "\n" for r in records))
    text_in = workdir / "text.jsonl"
    text_in.write_text("".join(json.dumps({"text": "\n".join(
        r[k] for k in ("prompt", "reference", "chosen", "rejected"))}) + "\n" for r in records))
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    runs = {
        "build_triplets": [sys.executable, str(repo / "tools/build_triplets.py"), "--input",
                           str(ours_in), "--output-prefix", str(workdir / f"cli_w{workers}"),
                           "--tokenizer", str(tokenizer), "--workers", str(workers), "--quiet"],
        "megatron_lm_preprocess_data": [
            sys.executable, str(megatron_lm / "tools/preprocess_data.py"), "--input", str(text_in),
            "--output-prefix", str(workdir / f"mlm_w{workers}"), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", str(tokenizer), "--workers",
            str(workers), "--append-eod"],
    }
    seconds = {}
    for name, cmd in runs.items():
        run_env = env
        if name.startswith("megatron"):  # its own dependencies may come on PYTHONPATH
            run_env = dict(env, PYTHONPATH=":".join(
                p for p in (str(megatron_lm), env.get("PYTHONPATH")) if p))
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=run_env, cwd=workdir, capture_output=True)
        seconds[name] = time.perf_counter() - start
    return {"workers": workers, "records": n_records, "input_mb": ours_in.stat().st_size / 1e6,
            "seconds": seconds}


def run_all(n_records: int = 4000, megatron_lm: Optional[Path] = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = train_tokenizer(work)
        builds = [build_throughput(n_records, w, work, tok) for w in (1, 2)]
        sampling = sampler_throughput(str(work / "out_w1"), 16384)
        sampling_shared = sampler_throughput(str(work / "out_w1"), 16384, shared_prefix=True)
        versus = ([against_megatron_lm(megatron_lm, n_records, w, work, tok) for w in (1, 2)]
                  if megatron_lm else None)
    packing = [packing_efficiency(b) for b in (16384, 32768)]
    return {"build": builds, "packing": packing, "sampler": sampling,
            "sampler_shared_prefix": sampling_shared, "against_megatron_lm": versus}
