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

import numpy as np

from megatron_polar.data.indexed import DTYPE, dataset_meta, staged_outputs
from megatron_polar.model.presets import ModelPreset


def write_synthetic_dataset(prefix: str, preset: ModelPreset, n_pairs: int, budget: int,
                            prompt_max: int, response_max: int, seed: int = 0) -> float:
    """Random pairs that each fit `budget` (and the preset's positions); returns the mean
    pair length."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    total = 0
    with staged_outputs(prefix) as tmp:
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DTYPE)
        written = 0
        while written < n_pairs:
            p = int(rng.integers(1, prompt_max + 1))
            ref, pos, neg = (int(x) for x in rng.integers(1, response_max + 1, 3))
            n_pos, n_neg = 2 * p + ref + pos + 3, 2 * p + ref + neg + 3
            if n_pos + n_neg > budget or max(n_pos, n_neg) > preset.max_position_embeddings:
                continue
            # [BOS] prompt sep reference <reward> prompt sep, shared by both sequences, then
            # each candidate and its reward token
            shared = rng.integers(3, preset.vocab_size - 1, 2 * p + ref + 2)
            pos_ids, neg_ids = (np.append(rng.integers(3, preset.vocab_size - 1, n),
                                          preset.reward_token_id) for n in (pos, neg))
            if pos and neg and pos_ids[0] == neg_ids[0]:  # candidates differ from the start
                neg_ids[0] = 3 + (neg_ids[0] - 2) % (preset.vocab_size - 4)
            ids = np.concatenate([shared, pos_ids, shared, neg_ids]).astype(DTYPE)
            builder.add_document(ids, [n_pos, n_neg])
            written += 1
            total += n_pos + n_neg
        builder.finalize(str(tmp["idx"]))
        tmp["rejected"].write_text("")
        tmp["meta"].write_text(json.dumps(dataset_meta(
            triplets=n_pairs, tokens=total,
            tokenizer={"path": f"synthetic:{preset.name}", "sha256": "synthetic"},
            special_ids={"bos_id": preset.bos_token_id, "separator_id": 3,
                         "reward_token_id": preset.reward_token_id},
            vocab_size=preset.vocab_size, max_length=budget, max_response_length=response_max,
            mode="synthetic", input_lines=n_pairs, rejected=0)))
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
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    lists = []
    while len(lists) < n_lists:
        p, ref = int(rng.integers(1, prompt_max + 1)), int(rng.integers(1, response_max + 1))
        shared = rng.integers(3, preset.vocab_size - 1, 2 * p + ref + 2)
        cands = [np.append(rng.integers(3, preset.vocab_size - 1,
                                        int(rng.integers(1, response_max + 1))),
                           preset.reward_token_id) for _ in range(k - 1)]
        seqs = [np.concatenate([shared, c]).astype(DTYPE) for c in cands]
        longest = sorted(len(x) for x in seqs)[-2:]
        if sum(longest) <= budget and longest[-1] <= preset.max_position_embeddings:
            lists.append(seqs)
    n_pairs = (k - 1) * (k - 2) // 2
    for kind in ("lists", "triplets"):
        with staged_outputs(f"{prefix}.{kind}") as tmp:
            builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DTYPE)
            tokens = sequences = 0
            for seqs in lists:
                docs = ([seqs] if kind == "lists" else
                        [[seqs[i], seqs[j]] for i in range(k - 1) for j in range(i + 1, k - 1)])
                for doc in docs:
                    builder.add_document(np.concatenate(doc), [len(x) for x in doc])
                    tokens += sum(len(x) for x in doc)
                    sequences += len(doc)
            builder.finalize(str(tmp["idx"]))
            tmp["rejected"].write_text("")
            extra = ({"documents": len(lists), "sequences": sequences} if kind == "lists"
                     else {})
            tmp["meta"].write_text(json.dumps(dataset_meta(
                triplets=n_pairs * len(lists), tokens=tokens,
                tokenizer={"path": f"synthetic:{preset.name}", "sha256": "synthetic"},
                special_ids={"bos_id": preset.bos_token_id, "separator_id": 3,
                             "reward_token_id": preset.reward_token_id},
                vocab_size=preset.vocab_size, max_length=budget,
                max_response_length=response_max, mode="rankings", input_lines=len(lists),
                rejected=0, **extra)))
