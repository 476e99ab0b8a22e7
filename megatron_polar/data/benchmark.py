"""Data-pipeline figures: build throughput, packing efficiency, sampler throughput."""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from pathlib import Path

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
    import io

    import sentencepiece as spm

    rng = random.Random(1)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(20000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   vocab_size=vocab_size, hard_vocab_limit=False,
                                   user_defined_symbols=["<|reward|>", "[UNUSED_TOKEN_130]"],
                                   byte_fallback=True, minloglevel=2)
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


def packing_efficiency(budget: int, steps: int = 200, lookahead: int = 1024) -> dict:
    logging.getLogger("megatron_polar.data.sampler").setLevel(logging.ERROR)  # counted below
    stream = LengthOnlyStream()
    sampler = PackingSampler(stream, budget, micro_batches_per_step=8, lookahead=lookahead)
    real = computed = 0
    for _ in range(steps):
        for pack in sampler.next_step_positions():
            real += sum(stream.length(p) for p in pack)
            computed += budget
    # Padding instead: each sequence padded to the longest possible one, no packing.
    longest_seq = 2 * stream.prefix_max + 2 * stream.response_max + 3
    pairs = sampler.position - len(sampler.window) - sampler.skipped_oversize
    padded = real / (pairs * 2 * longest_seq)
    return {"budget": budget, "packed_efficiency": real / computed,
            "padded_efficiency": padded, "skipped_oversize_pairs": sampler.skipped_oversize,
            "pairs": pairs}


def sampler_throughput(prefix: str, budget: int, steps: int = 50) -> dict:
    stream = TripletStream(BlendSpec.parse([prefix]))
    sampler = PackingSampler(stream, budget, micro_batches_per_step=4)
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        tokens += sum(mb.num_tokens for mb in sampler.next_step())
    seconds = time.perf_counter() - start
    return {"budget": budget, "tokens_per_s": tokens / seconds, "steps": steps}


def run_all(n_records: int = 4000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = train_tokenizer(work)
        builds = [build_throughput(n_records, w, work, tok) for w in (1, 2)]
        sampling = sampler_throughput(str(work / "out_w1"), 16384)
    packing = [packing_efficiency(b) for b in (16384, 32768)]
    return {"build": builds, "packing": packing, "sampler": sampling}
