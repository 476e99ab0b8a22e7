"""Score (prompt, reference, candidate) records with a POLAR reward model; print JSONL rewards.

    python -m megatron_polar.score --checkpoint runs/polar7b --input examples.jsonl
    python -m megatron_polar.score --hf POLAR-7B-mine --input examples.jsonl
    torchrun --nproc-per-node 2 -m megatron_polar.score --checkpoint CKPT \\
        --tensor-model-parallel-size 2 --input examples.jsonl

Each input line is a JSON object with `prompt`, `reference` and `candidate` (or `output`, as
POLAR's own client calls it; strings or chat message lists, as in training data), optional
`wrapper` ("sft" or "pretrain") and `id`. Each output line is `{"line": N, "id": ..., "reward":
R}` in input order. The sequence is built exactly as training builds it (docs/format.md); the
model runs through megatron-core at any TP/PP, from a megatron checkpoint or from an HF
directory (imported on the fly, so scoring an exported model checks the conversion both ways).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Optional

import torch


def build_parser() -> argparse.ArgumentParser:
    from megatron_polar.eval.flags import add_scorer_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL records (prompt, reference, candidate)")
    p.add_argument("--output", default="-", help="JSONL rewards (default: stdout)")
    add_scorer_args(p)
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
                raise RecordError(f"{path}:{n}: {e}") from None
            out.append((record.get("id"), n, ids))
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_polar.config.flags import ConfigError
    from megatron_polar.data.encoding import RecordError
    from megatron_polar.eval.flags import scoring_limits, source_from_args
    from megatron_polar.eval.scorer import RewardScorer, ScorerError
    from megatron_polar.training.arguments import run_config_from_args

    try:
        limits = scoring_limits(args)
        with source_from_args(args) as source:
            # The input is read (and every record encoded) before the model is built: a bad
            # line fails in seconds, not after loading a 7B model.
            encoder = source.encoder(limits.encoding)
            records = read_records(args.input, encoder)
            scorer = RewardScorer.load(source, run_config_from_args(args, source.preset.num_layers),
                                       encoder=encoder, micro_batch_tokens=limits.micro_batch_tokens)
    except (ScorerError, ConfigError, RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rewards = scorer.score_ids([ids for _, _, ids in records])
    ctx = scorer.ctx
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        with (contextlib.nullcontext(sys.stdout) if args.output == "-"
              else open(args.output, "w", encoding="utf-8")) as out:
            for (rid, line, _), r in zip(records, rewards):
                out.write(json.dumps({"line": line, "id": rid, "reward": r}) + "\n")
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
