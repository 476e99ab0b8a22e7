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
    """Random pairs that each fit `budget`; returns the mean pair length."""
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
            if n_pos + n_neg > budget:
                continue
            ids = rng.integers(3, preset.vocab_size - 1, n_pos + n_neg).astype(DTYPE)
            ids[n_pos - 1] = ids[-1] = preset.reward_token_id
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
    return {"steps": len(timed), "step_seconds": seconds / len(timed),
            "tokens_per_step": tokens / len(timed), "tokens_per_s": tokens / seconds,
            "tflops_per_gpu": sum(r["tflops_per_gpu"] * r["step_seconds"] for r in timed) / seconds,
            "mfu": (sum(r["mfu"] * r["step_seconds"] for r in timed) / seconds
                    if last["mfu"] is not None else None),
            "packing_efficiency": sum(r["packing_efficiency"] for r in timed) / len(timed),
            **mem}


def world_layout() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them, before any process group exists."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
