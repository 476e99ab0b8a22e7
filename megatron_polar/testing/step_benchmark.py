"""Training-step throughput through the real trainer: tokens/s, and on a GPU TFLOP/s and MFU.

A synthetic triplet dataset with a POLAR-like length mix (the prompt shared by both
sequences, reference and candidates of independent lengths, random token ids) is written in
the trainer's own dataset format, then `python -m megatron_polar.train` runs on it: the
packing sampler, megatron schedules, DDP, optimizer and logging, exactly as in training.
The figures are read back from the trainer's JSON log, warm-up steps left out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from megatron_polar.data.indexed import DTYPE, dataset_meta, staged_outputs
from megatron_polar.model.presets import ModelPreset


def _write_documents(prefix: str, preset: ModelPreset, documents: list, budget: int,
                     response_max: int, mode: str, lists: bool = False,
                     input_lines: Optional[int] = None) -> int:
    """Write `documents` (each a list of int32 sequences) as a dataset of ours under `prefix`,
    with a synthetic tokenizer identity; `lists`: one ranked list per document
    (FORMAT_LISTS), else one triplet per two-sequence document. Returns the tokens written."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokens = sequences = pairs = 0
    with staged_outputs(prefix) as tmp:
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DTYPE)
        for doc in documents:
            builder.add_document(np.concatenate(doc), [len(x) for x in doc])
            tokens += sum(len(x) for x in doc)
            sequences += len(doc)
            pairs += len(doc) * (len(doc) - 1) // 2
        builder.finalize(str(tmp["idx"]))
        tmp["rejected"].write_text("")
        extra = {"documents": len(documents), "sequences": sequences} if lists else {}
        tmp["meta"].write_text(json.dumps(dataset_meta(
            triplets=pairs, tokens=tokens,
            tokenizer={"path": f"synthetic:{preset.name}", "sha256": "synthetic"},
            special_ids={"bos_id": preset.bos_token_id, "separator_id": 3,
                         "reward_token_id": preset.reward_token_id},
            vocab_size=preset.vocab_size, max_length=budget, max_response_length=response_max,
            mode=mode, input_lines=len(documents) if input_lines is None else input_lines,
            rejected=0, **extra)))
    return tokens


def _candidate(rng, preset: ModelPreset, n: int) -> np.ndarray:
    """n random ids and the reward token."""
    return np.append(rng.integers(3, preset.vocab_size - 1, n), preset.reward_token_id)


def write_synthetic_dataset(prefix: str, preset: ModelPreset, n_pairs: int, budget: int,
                            prompt_max: int, response_max: int, seed: int = 0) -> float:
    """Random pairs that each fit `budget` (and the preset's positions); returns the mean
    pair length."""
    rng = np.random.default_rng(seed)
    documents = []
    while len(documents) < n_pairs:
        p = int(rng.integers(1, prompt_max + 1))
        ref, pos, neg = (int(x) for x in rng.integers(1, response_max + 1, 3))
        n_pos, n_neg = 2 * p + ref + pos + 3, 2 * p + ref + neg + 3
        if n_pos + n_neg > budget or max(n_pos, n_neg) > preset.max_position_embeddings:
            continue
        # [BOS] prompt sep reference <reward> prompt sep, shared by both sequences, then
        # each candidate and its reward token
        shared = rng.integers(3, preset.vocab_size - 1, 2 * p + ref + 2)
        pos_ids, neg_ids = (_candidate(rng, preset, n) for n in (pos, neg))
        if pos and neg and pos_ids[0] == neg_ids[0]:  # candidates differ from the start
            neg_ids[0] = 3 + (neg_ids[0] - 2) % (preset.vocab_size - 4)
        documents.append([np.concatenate([shared, c]).astype(DTYPE) for c in (pos_ids, neg_ids)])
    total = _write_documents(prefix, preset, documents, budget, response_max, "synthetic")
    return total / n_pairs


def summarize(log_json: str, warmup_steps: int) -> dict:
    """Throughput over the logged steps after warm-up (the trainer logs every step)."""
    records = [r for r in map(json.loads, Path(log_json).read_text().splitlines())
               if r["kind"] == "train"]
    timed = [r for r in records if r["iteration"] > warmup_steps]
    if not timed:
        raise ValueError(f"{log_json}: no steps after the {warmup_steps} warm-up steps")
    seconds = sum(r["step_seconds"] for r in timed)
    tokens = timed[-1]["consumed_tokens"] - (records[warmup_steps - 1]["consumed_tokens"]
                                             if warmup_steps else 0)
    last = timed[-1]
    mem = {k: v for k, v in last.items() if k.startswith("mem_")}
    pairs = timed[-1]["consumed_pairs"] - (records[warmup_steps - 1]["consumed_pairs"]
                                           if warmup_steps else 0)
    return {"steps": len(timed), "step_seconds": seconds / len(timed),
            "tokens_per_step": tokens / len(timed), "tokens_per_s": tokens / seconds,
            "pairs_per_s": pairs / seconds,
            "computed_tokens_per_pair": (tokens / pairs) * (1 - sum(
                r.get("prefix_saving", 0.0) for r in timed) / len(timed)),
            "tflops_per_gpu": sum(r["tflops_per_gpu"] * r["step_seconds"] for r in timed) / seconds,
            "mfu": (sum(r["mfu"] * r["step_seconds"] for r in timed) / seconds
                    if last["mfu"] is not None else None),
            "packing_efficiency": sum(r["packing_efficiency"] for r in timed) / len(timed),
            **mem}


def world_layout() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them, before any process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def write_synthetic_lists(prefix: str, preset: ModelPreset, n_lists: int, k: int,
                         budget: int, prompt_max: int, response_max: int,
                         seed: int = 0) -> None:
    """Random ranked lists of `k` responses (the reference in the shared prefix, k - 1
    candidates), each a POLAR-like sequence, written twice: `prefix`.lists (one document per
    list, FORMAT_LISTS) and `prefix`.triplets (the same lists as their (k-1)(k-2)/2 triplets,
    as `--from-rankings` writes them). Lists whose every pair fits `budget` only."""
    rng = np.random.default_rng(seed)
    lists = []
    while len(lists) < n_lists:
        p, ref = int(rng.integers(1, prompt_max + 1)), int(rng.integers(1, response_max + 1))
        shared = rng.integers(3, preset.vocab_size - 1, 2 * p + ref + 2)
        seqs = [np.concatenate([shared, _candidate(rng, preset,
                                                   int(rng.integers(1, response_max + 1)))])
                .astype(DTYPE) for _ in range(k - 1)]
        longest = sorted(len(x) for x in seqs)[-2:]
        if sum(longest) <= budget and longest[-1] <= preset.max_position_embeddings:
            lists.append(seqs)
    triplets = [[seqs[i], seqs[j]] for seqs in lists
                for i in range(k - 1) for j in range(i + 1, k - 1)]
    _write_documents(f"{prefix}.lists", preset, lists, budget, response_max, "rankings",
                     lists=True)
    _write_documents(f"{prefix}.triplets", preset, triplets, budget, response_max, "rankings",
                     input_lines=len(lists))
