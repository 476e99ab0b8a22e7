"""The on-disk format of a triplet dataset: megatron-core's indexed `.bin`/`.idx` pair, one
document of two sequences (s+, s-) per triplet, beside `.meta.json` (what readers check) and
`.rejected.jsonl` (the lines a build did not write). docs/format.md describes the files.

Every file of a dataset is written under a temporary name and renamed into place, metadata
last (`staged_outputs`): a dataset is either whole or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

FORMAT = "megatron-polar-triplets/1"  # one document of two sequences (s+, s-) per triplet
# One document per ranked list (`build_triplets --from-rankings --list-documents`): the
# list's candidates, best first, each a whole sequence; every ordered pair i < j is a
# triplet. Documents of two sequences are triplets as in /1. Readers of /1 refuse it.
FORMAT_LISTS = "megatron-polar-triplets/2"
READABLE_FORMATS = (FORMAT, FORMAT_LISTS)
DTYPE = np.int32  # InternLM2's 92544-token vocabulary does not fit uint16


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
                 documents: Optional[int] = None, sequences: Optional[int] = None,
                 **extra) -> dict:
    """The `.meta.json` of a dataset: what readers check (format, counts, tokenizer identity,
    special ids, vocabulary, dtype) plus whatever the writer records in `extra`. With
    `documents` (and `sequences`), a ranked-list dataset (FORMAT_LISTS); `triplets` then
    counts its ordered pairs."""
    if documents is not None:
        return {"format": FORMAT_LISTS, "triplets": triplets, "documents": documents,
                "sequences": sequences, "tokens": tokens, "tokenizer": tokenizer,
                "special_ids": special_ids, "vocab_size": vocab_size,
                "dtype": np.dtype(DTYPE).name, "max_length": max_length,
                "max_response_length": max_response_length, "mode": mode, **extra}
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
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected one of "
                         f"{', '.join(map(repr, READABLE_FORMATS))} (written by a newer "
                         "megatron_polar?)")
    return meta
