"""Build indexed binary triplet datasets (megatron-core `.bin`/`.idx`) from JSONL.

Each triplet is one document of two sequences, s+ then s-. Every input line is either written
(as one triplet, or several for a ranked record) or rejected with its `file:line` and reason;
without `skip_bad` the first bad line stops the build and nothing is left behind. Outputs are
written under temporary names and renamed into place at the end, metadata last.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from megatron_polar.data.encoding import (WRAPPERS, EncodingConfig, RecordError, TripletEncoder,
                                          field_text)
from megatron_polar.data.records import (RANKING_FIELDS, TRAJECTORY_FIELDS, TRIPLET_FIELDS, Line,
                                         count_lines, expand_inputs, iter_lines,
                                         parse_json_object)
from megatron_polar.data.tokenizer import PolarTokenizer

FORMAT = "megatron-polar-triplets/1"
DTYPE = np.int32  # InternLM2's 92544-token vocabulary does not fit uint16
CHUNK_LINES = 256


class BuildError(RuntimeError):
    """A build that stopped; the message names the file and line."""


@dataclass
class BuildConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    workers: int = 1
    max_length: int = 16384
    max_response_length: int = 4096
    skip_bad: bool = False
    from_trajectories: bool = False
    from_rankings: bool = False
    seed: int = 1234
    partitions: int = 1
    partition_index: int = 0
    separator_id: Optional[int] = None
    reward_token_id: Optional[int] = None
    command: list[str] = field(default_factory=lambda: list(sys.argv))

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if not 0 <= self.partition_index < self.partitions:
            raise ValueError("--partition-index must be in [0, --partitions)")
        if self.from_trajectories and self.from_rankings:
            raise ValueError("--from-trajectories and --from-rankings are mutually exclusive")
        if self.partitions > 1 and self.from_trajectories:
            raise ValueError("--from-trajectories groups trajectories by prompt across the whole "
                             "input; build it in one partition (shard the inputs by prompt instead)")


@dataclass
class BuildSummary:
    read: int = 0
    written: int = 0
    rejected: int = 0
    unused: int = 0  # trajectories that went into no triplet (--from-trajectories)
    triplets: int = 0  # documents written: a ranked record (--from-rankings) gives several
    tokens: int = 0
    # written lines whose fields contained special-token text, removed (docs/data.md)
    special_text_lines: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        unused = f" + {self.unused:,} unused trajectories" if self.unused else ""
        special = (f"; {self.special_text_lines:,} with special-token text removed"
                   if self.special_text_lines else "")
        return (f"read {self.read:,} lines = {self.written:,} written + {self.rejected:,} rejected"
                f"{unused}; {self.triplets:,} triplets, {self.tokens:,} tokens in "
                f"{self.seconds:.1f}s{special}")


# ---- workers: encode chunks of records ----------------------------------------------------

_ENCODER: Optional[TripletEncoder] = None


def _init_worker(tokenizer: str, separator_id, reward_token_id, enc: EncodingConfig):
    global _ENCODER
    tok = PolarTokenizer(tokenizer, separator_id=separator_id, reward_token_id=reward_token_id)
    _ENCODER = TripletEncoder(tok, enc)


def record_wrapper(record: dict) -> str:
    """The record's `wrapper` field (default "sft"), checked against WRAPPERS."""
    wrapper = record.get("wrapper", "sft")
    if not isinstance(wrapper, str):
        raise RecordError("field 'wrapper' must be a string")
    if wrapper not in WRAPPERS:
        raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
    return wrapper


def _encode_one(record: dict) -> list[list[int]]:
    return list(_ENCODER.encode(record["prompt"], record["reference"], record["chosen"],
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


def _encode_ranking(record: dict) -> list[list[int]]:
    """s+ and s- of every triplet of a ranked record. One triplet that cannot be encoded
    rejects the whole record: a line is written or rejected as a unit, so the summary and the
    reject file stay per line and no ranking is kept in part."""
    responses, wrapper = record["responses"], record_wrapper(record)
    seqs = []
    for i, j in ranking_pairs(record):
        try:
            seqs += _ENCODER.encode(record["prompt"], responses[0], responses[i], responses[j],
                                    wrapper)
        except RecordError as e:
            raise RecordError(f"responses (reference 0, chosen {i}, rejected {j}): {e}") from None
    return seqs


def _encode_chunk(items: list[tuple[str, bytes | dict]], rankings: bool = False):
    """[(where, raw line or assembled record)] -> [(where, (ids of each triplet's s+ then s-,
    their lengths, whether special-token text was removed), None) or (where, reason, raw
    line)]; a ranked line gives several triplets."""
    out = []
    for where, item in items:
        removed = _ENCODER.special_text_records
        try:
            if isinstance(item, dict):
                seqs = _encode_one(item)
            elif rankings:
                seqs = _encode_ranking(parse_json_object(item, RANKING_FIELDS))
            else:
                seqs = _encode_one(parse_json_object(item, TRIPLET_FIELDS))
            lengths = [len(s) for s in seqs]
            # One int32 array per line: far cheaper to send back than lists of ints.
            ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=DTYPE, count=sum(lengths))
            out.append((where, (ids, lengths, _ENCODER.special_text_records > removed), None))
        except RecordError as e:
            out.append((where, str(e), item if isinstance(item, bytes) else None))
    return out


# ---- trajectories -> triplets --------------------------------------------------------------

def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def assemble_from_trajectories(lines: Iterable[Line], seed: int, rejected: list, used: list):
    """Pre-training triplets from per-policy generations.

    For each prompt and each policy A with two or more trajectories: reference and positive are
    two of A's trajectories, the negative one trajectory of another policy, all chosen with a
    generator seeded by (seed, prompt_id). Returns [(where, record)]; appends bad lines to
    `rejected` and the origins of lines used in triplets to `used`.
    """
    prompts: dict[str, dict] = {}
    for line in lines:
        try:
            rec = parse_json_object(line.raw, TRAJECTORY_FIELDS)
            for name in ("prompt_id", "policy"):
                if not isinstance(rec[name], (str, int)):
                    raise RecordError(f"field '{name}' must be a string or an integer")
            if not isinstance(rec["trajectory"], str) or not rec["trajectory"].strip():
                raise RecordError("field 'trajectory' must be a non-empty string")
            if rec.get("wrapper", "pretrain") not in WRAPPERS:
                raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}")
        except RecordError as e:
            rejected.append((line.where, str(e), line.raw))
            continue
        # Corpus continuations are plain concatenations ("pretrain"); answers to instruction
        # prompts carry "wrapper": "sft" (tools/sample_trajectories.py writes it).
        entry = prompts.setdefault(str(rec["prompt_id"]), {
            "prompt": rec["prompt"], "wrapper": rec.get("wrapper", "pretrain"), "by_policy": {}})
        entry["by_policy"].setdefault(str(rec["policy"]), []).append((line.where, rec["trajectory"]))

    triplets = []
    for prompt_id, entry in prompts.items():
        rng = np.random.default_rng([seed, _stable_int(prompt_id)])
        policies = sorted(entry["by_policy"])
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
            triplets.append((f"{own[i][0]}+{own[j][0]}+{neg_where}", record))
            used.extend([own[i][0], own[j][0], neg_where])
    return triplets


# ---- the build --------------------------------------------------------------------------------

def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def output_paths(prefix: str) -> dict[str, Path]:
    return {kind: Path(f"{prefix}{suffix}") for kind, suffix in (
        ("bin", ".bin"), ("idx", ".idx"), ("meta", ".meta.json"), ("rejected", ".rejected.jsonl"))}


@contextlib.contextmanager
def staged_outputs(prefix: str) -> Iterator[dict[str, Path]]:
    """Temporary paths for every file of a dataset: renamed into place (metadata last) when the
    block succeeds, removed when it fails, so a dataset is either whole or absent."""
    paths = output_paths(prefix)
    paths["bin"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: p.with_name(p.name + f".tmp{os.getpid()}") for k, p in paths.items()}
    try:
        yield tmp
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    for kind in ("bin", "idx", "rejected", "meta"):
        os.replace(tmp[kind], paths[kind])


def dataset_meta(*, triplets: int, tokens: int, tokenizer: dict, special_ids: dict,
                 vocab_size: int, max_length: int, max_response_length: int, mode: str,
                 **extra) -> dict:
    """The `.meta.json` of a dataset: what readers check (format, counts, tokenizer identity,
    special ids, vocabulary, dtype) plus whatever the writer records in `extra`."""
    return {"format": FORMAT, "triplets": triplets, "sequences": 2 * triplets,
            "tokens": tokens, "tokenizer": tokenizer, "special_ids": special_ids,
            "vocab_size": vocab_size, "dtype": np.dtype(DTYPE).name, "max_length": max_length,
            "max_response_length": max_response_length, "mode": mode, **extra}


def read_meta(prefix: str) -> dict:
    """The metadata of a built dataset, checked to be of this format."""
    path = output_paths(prefix)["meta"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {prefix} a megatron_polar triplet dataset?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start, self.last = enabled, time.perf_counter(), 0.0

    def update(self, s: BuildSummary, final: bool = False):
        now = time.perf_counter()
        if self.enabled and (final or now - self.last > 2.0):
            self.last = now
            rate = s.read / max(now - self.start, 1e-9)
            print(f"\r[build_triplets] {s.read:,} lines  {s.written:,} written  "
                  f"{s.rejected:,} rejected  {rate:,.0f} lines/s", end="\n" if final else "",
                  file=sys.stderr, flush=True)


def build_triplets(cfg: BuildConfig, progress: bool = True) -> BuildSummary:
    """Run a build; returns its summary or raises BuildError (and leaves no output)."""
    # Imported here: spawned workers import this module and need no megatron-core, whose
    # import (torch included) would cost each of them seconds.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    files = expand_inputs(cfg.inputs)
    tokenizer = PolarTokenizer(cfg.tokenizer, separator_id=cfg.separator_id,
                               reward_token_id=cfg.reward_token_id)
    enc = EncodingConfig(cfg.max_length, cfg.max_response_length)
    summary, bar, start = BuildSummary(), _Progress(progress), time.perf_counter()
    rejected_lines: list = []

    if cfg.from_trajectories:
        used: list = []
        lines = list(iter_lines(files))
        items = assemble_from_trajectories(lines, cfg.seed, rejected_lines, used)
        summary.read = len(lines)
        summary.unused = len(lines) - len(rejected_lines) - len(set(used))
    else:
        first, stop = 0, None
        if cfg.partitions > 1:
            total = count_lines(files)
            first = total * cfg.partition_index // cfg.partitions
            stop = total * (cfg.partition_index + 1) // cfg.partitions
        items = ((line.where, line.raw) for line in iter_lines(files, first, stop))

    pool = None
    try:
        with staged_outputs(cfg.output_prefix) as tmp, \
                open(tmp["rejected"], "w", encoding="utf-8") as rejects:
            builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DTYPE)
            for where, reason, raw in rejected_lines:
                _reject(rejects, where, reason, raw, cfg.skip_bad, summary)
            initargs = (cfg.tokenizer, cfg.separator_id, cfg.reward_token_id, enc)
            encode = functools.partial(_encode_chunk, rankings=cfg.from_rankings)
            if cfg.workers > 1:
                pool = multiprocessing.get_context("spawn").Pool(
                    cfg.workers, initializer=_init_worker, initargs=initargs)
                results = pool.imap(encode, _chunks(items, CHUNK_LINES))
            else:
                _init_worker(*initargs)
                results = map(encode, _chunks(items, CHUNK_LINES))
            for chunk in results:
                for where, result, raw in chunk:
                    if not cfg.from_trajectories:
                        summary.read += 1
                    if isinstance(result, str):
                        _reject(rejects, where, result, raw, cfg.skip_bad, summary)
                        continue
                    ids, lengths, removed = result
                    summary.special_text_lines += removed
                    offset = 0
                    for n_pos, n_neg in zip(lengths[::2], lengths[1::2]):
                        builder.add_document(ids[offset:offset + n_pos + n_neg], [n_pos, n_neg])
                        offset += n_pos + n_neg
                        summary.triplets += 1
                    summary.written += 1
                    summary.tokens += len(ids)
                bar.update(summary)
            builder.finalize(str(tmp["idx"]))
            summary.seconds = time.perf_counter() - start
            meta = dataset_meta(
                triplets=summary.triplets, tokens=summary.tokens,
                tokenizer=tokenizer.identity().as_dict(), special_ids=tokenizer.special_ids(),
                vocab_size=tokenizer.vocab_size, max_length=cfg.max_length,
                max_response_length=cfg.max_response_length,
                mode=("trajectories" if cfg.from_trajectories else
                      "rankings" if cfg.from_rankings else "triplets"),
                input_lines=summary.read, rejected=summary.rejected,
                unused_trajectories=summary.unused,
                special_text_lines=summary.special_text_lines,
                partition=[cfg.partition_index, cfg.partitions], inputs=files,
                command=cfg.command)
            tmp["meta"].write_text(json.dumps(meta, indent=2))
    finally:
        if pool is not None:
            pool.terminate()
    bar.update(summary, final=True)
    return summary


def _reject(out, where: str, reason: str, raw: Optional[bytes], skip_bad: bool,
            summary: BuildSummary) -> None:
    if not skip_bad:
        raise BuildError(f"{where}: {reason} (use --skip-bad to write such lines to "
                         "PREFIX.rejected.jsonl and go on)")
    summary.rejected += 1
    entry = {"where": where, "reason": reason}
    if raw is not None:
        entry["line"] = raw.decode("utf-8", errors="replace")
    out.write(json.dumps(entry, ensure_ascii=False) + "\n")
