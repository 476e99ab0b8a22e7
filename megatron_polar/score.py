"""Score (prompt, reference, candidate) records with a POLAR reward model; print JSONL rewards.

    python -m megatron_polar.score --checkpoint runs/polar7b --input examples.jsonl
    python -m megatron_polar.score --hf POLAR-7B-mine --input examples.jsonl
    torchrun --nproc-per-node 2 -m megatron_polar.score --checkpoint CKPT \\
        --tensor-model-parallel-size 2 --input examples.jsonl

Each input line is a JSON object with `prompt`, `reference` and `candidate` (or `output`, as
POLAR's own client calls it; strings or chat message lists, as in training data), optional
`wrapper` ("sft" or "pretrain") and `id`. Each output line is `{"line": N, "id": ..., "reward":
R}` in input order. The sequence is built exactly as training builds it (POLAR-SPEC.md); the
model runs through megatron-core at any TP/PP, from a megatron checkpoint or from an HF
directory (imported on the fly, so scoring an exported model checks the conversion both ways).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch


def build_parser() -> argparse.ArgumentParser:
    from megatron_polar.training.arguments import add_model_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="megatron checkpoint: run dir, iter_N dir or weights")
    src.add_argument("--hf", help="HF InternLM2ForRewardModel directory (e.g. an export)")
    p.add_argument("--input", required=True, help="JSONL records (prompt, reference, candidate)")
    p.add_argument("--output", default="-", help="JSONL rewards (default: stdout)")
    p.add_argument("--tokenizer", default=None,
                   help="default: the tokenizer kept in the checkpoint / HF directory")
    p.add_argument("--max-length", type=int, default=16384)
    p.add_argument("--max-response-length", type=int, default=4096)
    p.add_argument("--micro-batch-tokens", type=int, default=8192,
                   help="tokens per packed micro-batch (raised to the longest pair if needed)")
    add_model_args(p)
    return p


def read_records(path: str, encoder) -> list[tuple[Optional[object], int, list[int]]]:
    """(id, line number, token ids) per record; a bad line is an error naming file, line, reason."""
    from megatron_polar.data.encoding import RecordError

    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise RecordError("not a JSON object")
                # POLAR's own client calls the candidate "output"; both names are accepted.
                candidate = record.get("candidate", record.get("output"))
                for field, value in (("prompt", record.get("prompt")),
                                     ("reference", record.get("reference")),
                                     ("candidate' (or 'output", candidate)):
                    if value is None:
                        raise RecordError(f"missing field '{field}'")
                ids = encoder.encode_sequence(record["prompt"], record["reference"], candidate,
                                              record.get("wrapper", "sft"))
            except (json.JSONDecodeError, RecordError) as e:
                raise SystemExit(f"error: {path}:{n}: {e}") from None
            out.append((record.get("id"), n, ids))
    return out


def score_sequences(chunks, ctx, sequences: list[list[int]], token_budget: int,
                    pad_id: int) -> Optional[list[float]]:
    """Rewards of `sequences` in order (on the last pipeline stage; None elsewhere)."""
    from megatron_polar.data.packing import pack_pairs
    from megatron_polar.training.step import score_packed

    if not sequences:
        return []
    # The packer moves pairs; two sequences make a "pair" here (the last one doubled if odd).
    padded = sequences + ([sequences[-1]] if len(sequences) % 2 else [])
    pairs = [(padded[i], padded[i + 1]) for i in range(0, len(padded), 2)]
    budget = max(token_budget, max(len(a) + len(b) for a, b in pairs))
    packs = pack_pairs(pairs, budget, pad_id)
    rewards = score_packed(chunks, packs, ctx)
    if rewards is None:
        return None
    by_pair, k = {}, 0
    for pack in packs:
        for pair_id in pack.pair_ids:
            by_pair[pair_id] = (rewards[k].item(), rewards[k + 1].item())
            k += 2
    flat = [r for i in range(len(pairs)) for r in by_pair[i]]
    return flat[:len(sequences)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_polar.data.encoding import EncodingConfig, TripletEncoder
    from megatron_polar.data.tokenizer import PolarTokenizer
    from megatron_polar.model.presets import checkpoint_preset, get_preset
    from megatron_polar.training.arguments import run_config_from_args
    from megatron_polar.training.checkpointing import load_model_weights, resolve_checkpoint_dir
    from megatron_polar.training.parallel import initialize_parallel
    from megatron_polar.training.step import build_model_chunks

    if args.hf and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: --hf scores in one process; for TP/PP, import first (tools/convert_hf.py "
              "import) and pass --checkpoint", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="polar_score_") as tmp:
        if args.hf:
            from megatron_polar.convert.hf_config import ConversionError
            from megatron_polar.convert.importer import import_hf

            try:
                import_hf(args.hf, Path(tmp) / "ckpt", tokenizer=args.tokenizer)
            except ConversionError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            checkpoint = Path(tmp) / "ckpt"
        else:
            checkpoint = resolve_checkpoint_dir(args.checkpoint)
        preset = get_preset(args.model_preset) if args.model_preset else checkpoint_preset(
            checkpoint)
        if preset is None:
            print(f"error: {checkpoint} records no model preset; pass --model-preset",
                  file=sys.stderr)
            return 2
        tokenizer = args.tokenizer or (checkpoint / "tokenizer")
        if not Path(tokenizer).exists():
            print(f"error: {checkpoint} carries no tokenizer; pass --tokenizer", file=sys.stderr)
            return 2
        encoder = TripletEncoder(PolarTokenizer(tokenizer),
                                 EncodingConfig(args.max_length, args.max_response_length))
        records = read_records(args.input, encoder)

        run = run_config_from_args(args, preset.num_layers)
        ctx = initialize_parallel(run)
        chunks = build_model_chunks(preset, run, ctx)
        load_model_weights(chunks, checkpoint)
        rewards = score_sequences(chunks, ctx, [ids for _, _, ids in records],
                                  args.micro_batch_tokens, preset.pad_token_id)
    if rewards is not None and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        with (contextlib.nullcontext(sys.stdout) if args.output == "-"
              else open(args.output, "w", encoding="utf-8")) as out:
            for (rid, line, _), r in zip(records, rewards):
                out.write(json.dumps({"line": line, "id": rid, "reward": r}) + "\n")
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
