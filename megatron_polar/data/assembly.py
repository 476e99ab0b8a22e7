"""Records to triplets: what a line of JSONL means before it is tokenized.

A triplet record is used as it is; a ranked record (`responses`, best first) gives every
ordered pair (`ranking_pairs`); trajectories of several policies are assembled into
pre-training triplets (`assemble_from_trajectories`). `encode_triplet` and `encode_ranking`
turn a record into the token ids of s+ and s- through a `TripletEncoder`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from megatron_polar.data.encoding import WRAPPERS, RecordError, TripletEncoder, field_text
from megatron_polar.data.records import TRAJECTORY_FIELDS, Line, parse_json_object


def record_wrapper(record: dict) -> str:
    """The record's `wrapper` field (default "sft"), checked against WRAPPERS."""
    wrapper = record.get("wrapper", "sft")
    if not isinstance(wrapper, str):
        raise RecordError("field 'wrapper' must be a string")
    if wrapper not in WRAPPERS:
        raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
    return wrapper


def encode_triplet(encoder: TripletEncoder, record: dict) -> list[list[int]]:
    """s+ and s- of a triplet record."""
    return list(encoder.encode(record["prompt"], record["reference"], record["chosen"],
                               record["rejected"], record_wrapper(record)))


def ranking_pairs(record: dict) -> list[tuple[int, int]]:
    """(chosen, rejected) indices of the triplets of a ranked record, reference responses[0]:
    every 1 <= i < j < len(responses), in that order; RecordError for ill-formed responses."""
    responses = record["responses"]
    if not isinstance(responses, list):
        raise RecordError("field 'responses' must be a list of responses, best first, got "
                          f"{type(responses).__name__}")
    if len(responses) < 3:
        raise RecordError(f"field 'responses' needs at least 3 responses, got {len(responses)}")
    # Checked here, not per triplet, so that the reason names the field or the response index.
    field_text(record["prompt"], "prompt")
    for k, response in enumerate(responses):
        field_text(response, f"responses[{k}]")
    return [(i, j) for i in range(1, len(responses)) for j in range(i + 1, len(responses))]


def encode_ranking(encoder: TripletEncoder, record: dict) -> list[list[int]]:
    """s+ and s- of every triplet of a ranked record. One triplet that cannot be encoded
    rejects the whole record: a line is written or rejected as a unit, so the summary and the
    reject file stay per line and no ranking is kept in part."""
    responses, wrapper = record["responses"], record_wrapper(record)
    seqs = []
    for i, j in ranking_pairs(record):
        try:
            seqs += encoder.encode(record["prompt"], responses[0], responses[i], responses[j],
                                   wrapper)
        except RecordError as e:
            raise RecordError(f"responses (reference 0, chosen {i}, rejected {j}): {e}") from None
    return seqs


# ---- trajectories -> triplets --------------------------------------------------------------

@dataclass(frozen=True)
class AssembledTriplet:
    where: str  # the three lines, joined by "+"
    record: dict  # prompt, reference, chosen, rejected, wrapper: a triplet record
    origins: tuple[str, str, str]  # the lines of the reference, the chosen and the rejected


@dataclass
class Assembly:
    """Triplets assembled from trajectory lines, and what became of every line."""

    triplets: list[AssembledTriplet]
    rejected: list[tuple[str, str, bytes]]  # (where, reason, raw line) of each bad line
    lines: int  # lines read
    used: set[str] = field(init=False)

    def __post_init__(self):
        self.used = {o for t in self.triplets for o in t.origins}

    @property
    def unused(self) -> int:
        """Good lines that went into no triplet (a policy's third trajectory, say)."""
        return self.lines - len(self.rejected) - len(self.used)


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _trajectory(line: Line) -> dict:
    rec = parse_json_object(line.raw, TRAJECTORY_FIELDS)
    for name in ("prompt_id", "policy"):
        if not isinstance(rec[name], (str, int)):
            raise RecordError(f"field '{name}' must be a string or an integer")
    if not isinstance(rec["trajectory"], str) or not rec["trajectory"].strip():
        raise RecordError("field 'trajectory' must be a non-empty string")
    if rec.get("wrapper", "pretrain") not in WRAPPERS:
        raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}")
    return rec


def assemble_from_trajectories(lines: Iterable[Line], seed: int) -> Assembly:
    """Pre-training triplets from per-policy generations.

    For each prompt and each policy A with two or more trajectories: reference and positive are
    two of A's trajectories, the negative one trajectory of another policy, all chosen with a
    generator seeded by (seed, prompt_id). Bad lines are listed in the result, not raised.
    """
    prompts: dict[str, dict] = {}
    rejected, count = [], 0
    for line in lines:
        count += 1
        try:
            rec = _trajectory(line)
        except RecordError as e:
            rejected.append((line.where, str(e), line.raw))
            continue
        # Corpus continuations are plain concatenations ("pretrain"); answers to instruction
        # prompts carry "wrapper": "sft" (tools/sample_trajectories.py writes it).
        entry = prompts.setdefault(str(rec["prompt_id"]), {
            "prompt": rec["prompt"], "wrapper": rec.get("wrapper", "pretrain"), "by_policy": {}})
        by_policy = entry["by_policy"].setdefault(str(rec["policy"]), [])
        by_policy.append((line.where, rec["trajectory"]))
    triplets = []
    for prompt_id, entry in prompts.items():
        rng = np.random.default_rng([seed, _stable_int(prompt_id)])
        triplets += _prompt_triplets(entry, rng)
    return Assembly(triplets, rejected, count)


def _prompt_triplets(entry: dict, rng: np.random.Generator) -> list[AssembledTriplet]:
    policies = sorted(entry["by_policy"])
    out = []
    for a in policies:
        own = entry["by_policy"][a]
        others = [p for p in policies if p != a]
        if len(own) < 2 or not others:
            continue
        i, j = rng.choice(len(own), 2, replace=False)
        b = others[int(rng.integers(len(others)))]
        k = int(rng.integers(len(entry["by_policy"][b])))
        neg_where, negative = entry["by_policy"][b][k]
        record = {"prompt": entry["prompt"], "reference": own[i][1], "chosen": own[j][1],
                  "rejected": negative, "wrapper": entry["wrapper"]}
        out.append(AssembledTriplet(f"{own[i][0]}+{own[j][0]}+{neg_where}", record,
                                    (own[i][0], own[j][0], neg_where)))
    return out
