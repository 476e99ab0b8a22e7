"""The parallel build of indexed triplet datasets (megatron-core `.bin`/`.idx`) from JSONL.

Each triplet is one document of two sequences, s+ then s-. Every input line is either written
(as one triplet, or several for a ranked record) or rejected with its `file:line` and reason;
without `skip_bad` the first bad line stops the build and nothing is left behind. Lines are
encoded in chunks by worker processes (`--workers`), in input order; the files are written as
indexed.py describes (atomically, metadata last). What a record means is assembly.py's.
"""

from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from megatron_polar.data.assembly import (assemble_from_trajectories, encode_ranking,
                                          encode_triplet)
from megatron_polar.data.encoding import EncodingConfig, RecordError, TripletEncoder
from megatron_polar.data.indexed import DTYPE, dataset_meta, staged_outputs
from megatron_polar.data.records import (RANKING_FIELDS, TRIPLET_FIELDS, count_lines,
                                         expand_inputs, iter_lines, parse_json_object)
from megatron_polar.data.tokenizer import PolarTokenizer

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
    # with from_rankings: one document per ranked list (FORMAT_LISTS), trained as one
    # shared-prefix item, instead of a document per triplet
    list_documents: bool = False
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
        if self.list_documents and not self.from_rankings:
            raise ValueError("--list-documents needs --from-rankings (ranked lists)")
        if self.partitions > 1 and self.from_trajectories:
            raise ValueError("--from-trajectories groups trajectories by prompt across the whole "
                             "input; build it in one partition (shard the inputs by prompt instead)")


@dataclass
class BuildSummary:
    read: int = 0
    written: int = 0
    rejected: int = 0
    unused: int = 0  # trajectories that went into no triplet (--from-trajectories)
    triplets: int = 0  # ordered pairs written: a ranked record (--from-rankings) gives several
    documents: int = 0  # documents written: one per triplet, or per ranked list
    sequences: int = 0
    tokens: int = 0
    # written lines whose fields contained special-token text, removed (docs/data.md)
    special_text_lines: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        unused = f" + {self.unused:,} unused trajectories" if self.unused else ""
        special = (f"; {self.special_text_lines:,} with special-token text removed"
                   if self.special_text_lines else "")
        return (f"read {self.read:,} lines = {self.written:,} written + {self.rejected:,} rejected"
                f"{unused}; {self.triplets:,} triplets"
                + (f" in {self.documents:,} documents" if self.documents != self.triplets else "")
                + f", {self.tokens:,} tokens in "
                f"{self.seconds:.1f}s{special}")


# ---- workers: encode chunks of records ----------------------------------------------------

_ENCODER: Optional[TripletEncoder] = None


def _init_worker(tokenizer: str, separator_id, reward_token_id, enc: EncodingConfig):
    global _ENCODER
    tok = PolarTokenizer(tokenizer, separator_id=separator_id, reward_token_id=reward_token_id)
    _ENCODER = TripletEncoder(tok, enc)


def list_document(seqs: list[list[int]], n_candidates: int) -> Optional[list[list[int]]]:
    """The candidates of a ranked list (best first) from its triplets' s+/s- in
    `ranking_pairs` order, when every triplet encoded each candidate alike; None when
    truncation made a candidate's sequence depend on its pair (the prompt's budget is the
    pair's), in which case the list is written as its triplets."""
    pairs = [(i, j) for i in range(n_candidates) for j in range(i + 1, n_candidates)]
    candidates: list[Optional[list[int]]] = [None] * n_candidates
    for (i, j), pos, neg in zip(pairs, seqs[0::2], seqs[1::2]):
        for k, seq in ((i, pos), (j, neg)):
            if candidates[k] is None:
                candidates[k] = seq
            elif candidates[k] != seq:
                return None
    return candidates


def _encode_chunk(items: list[tuple[str, bytes | dict]], rankings: bool = False,
                  list_documents: bool = False):
    """[(where, raw line or assembled record)] -> [(where, (ids of its documents' sequences,
    their lengths, sequences per document, whether special-token text was removed), None)
    or (where, reason, raw line)]; a ranked line gives several triplets (documents of s+ and
    s-) or, with `list_documents`, one document of its candidates."""
    out = []
    for where, item in items:
        removed = _ENCODER.special_text_records
        try:
            if isinstance(item, dict):
                seqs = encode_triplet(_ENCODER, item)
            elif rankings:
                record = parse_json_object(item, RANKING_FIELDS)
                seqs = encode_ranking(_ENCODER, record)
            else:
                seqs = encode_triplet(_ENCODER, parse_json_object(item, TRIPLET_FIELDS))
            docs = [2] * (len(seqs) // 2)
            if list_documents:
                candidates = list_document(seqs, len(record["responses"]) - 1)
                if candidates is not None:
                    seqs, docs = candidates, [len(candidates)]
            lengths = [len(s) for s in seqs]
            # One int32 array per line: far cheaper to send back than lists of ints.
            ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=DTYPE, count=sum(lengths))
            out.append((where, (ids, lengths, docs, _ENCODER.special_text_records > removed),
                        None))
        except RecordError as e:
            out.append((where, str(e), item if isinstance(item, bytes) else None))
    return out


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
    files = expand_inputs(cfg.inputs)
    tokenizer = PolarTokenizer(cfg.tokenizer, separator_id=cfg.separator_id,
                               reward_token_id=cfg.reward_token_id)
    summary, bar, start = BuildSummary(), _Progress(progress), time.perf_counter()
    items, rejected_lines = _items(cfg, files, summary)
    with staged_outputs(cfg.output_prefix) as tmp:
        with open(tmp["rejected"], "w", encoding="utf-8") as rejects:
            for where, reason, raw in rejected_lines:
                _reject(rejects, where, reason, raw, cfg.skip_bad, summary)
            _write(cfg, items, tmp, rejects, summary, bar)
        summary.seconds = time.perf_counter() - start
        lists = ({"documents": summary.documents, "sequences": summary.sequences}
                 if cfg.list_documents else {})
        meta = dataset_meta(
            triplets=summary.triplets, tokens=summary.tokens, **lists,
            tokenizer=tokenizer.identity().as_dict(), special_ids=tokenizer.special_ids(),
            vocab_size=tokenizer.vocab_size, max_length=cfg.max_length,
            max_response_length=cfg.max_response_length,
            mode=("trajectories" if cfg.from_trajectories else
                  "rankings" if cfg.from_rankings else "triplets"),
            input_lines=summary.read, rejected=summary.rejected,
            unused_trajectories=summary.unused, special_text_lines=summary.special_text_lines,
            partition=[cfg.partition_index, cfg.partitions], inputs=files, command=cfg.command)
        tmp["meta"].write_text(json.dumps(meta, indent=2))
    bar.update(summary, final=True)
    return summary


def _items(cfg: BuildConfig, files: list[str], summary: BuildSummary):
    """The items to encode ((where, raw line) or, from trajectories, (where, record)) and the
    lines already rejected while assembling."""
    if cfg.from_trajectories:
        assembly = assemble_from_trajectories(iter_lines(files), cfg.seed)
        summary.read, summary.unused = assembly.lines, assembly.unused
        return [(t.where, t.record) for t in assembly.triplets], assembly.rejected
    first, stop = 0, None
    if cfg.partitions > 1:
        total = count_lines(files)
        first = total * cfg.partition_index // cfg.partitions
        stop = total * (cfg.partition_index + 1) // cfg.partitions
    return ((line.where, line.raw) for line in iter_lines(files, first, stop)), []


def _write(cfg: BuildConfig, items, tmp: dict, rejects, summary: BuildSummary, bar) -> None:
    """Encode `items` (in worker processes if asked) and write them in input order."""
    # Imported here: spawned workers import this module and need no megatron-core, whose
    # import (torch included) would cost each of them seconds.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DTYPE)
    initargs = (cfg.tokenizer, cfg.separator_id, cfg.reward_token_id,
                EncodingConfig(cfg.max_length, cfg.max_response_length))
    encode = functools.partial(_encode_chunk, rankings=cfg.from_rankings,
                               list_documents=cfg.list_documents)
    pool = None
    try:
        if cfg.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(
                cfg.workers, initializer=_init_worker, initargs=initargs)
            results = pool.imap(encode, _chunks(items, CHUNK_LINES))
        else:
            _init_worker(*initargs)
            results = map(encode, _chunks(items, CHUNK_LINES))
        for chunk in results:
            for where, result, raw in chunk:
                summary.read += not cfg.from_trajectories  # assembled: counted already
                if isinstance(result, str):
                    _reject(rejects, where, result, raw, cfg.skip_bad, summary)
                else:
                    _add(builder, result, summary)
            bar.update(summary)
    finally:
        if pool is not None:
            pool.terminate()
    builder.finalize(str(tmp["idx"]))


def _add(builder, result, summary: BuildSummary) -> None:
    """One written line: its documents (a triplet's two sequences, or a ranked list's
    candidates, every ordered pair of which is a triplet)."""
    ids, lengths, docs, removed = result
    summary.special_text_lines += removed
    offset = first = 0
    for n in docs:
        doc_lengths = lengths[first:first + n]
        size = sum(doc_lengths)
        builder.add_document(ids[offset:offset + size], doc_lengths)
        offset, first = offset + size, first + n
        summary.triplets += n * (n - 1) // 2
        summary.documents += 1
        summary.sequences += n
    summary.written += 1
    summary.tokens += len(ids)


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
