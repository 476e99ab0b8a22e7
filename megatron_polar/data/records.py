"""Reading JSONL input line by line, with every line either parsed or given a reason; writing
files atomically.

Each line carries its origin (`file:line`) so errors and the reject file can name it.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from megatron_polar.data.encoding import RecordError

TRIPLET_FIELDS = ("prompt", "reference", "chosen", "rejected")
TRAJECTORY_FIELDS = ("prompt_id", "prompt", "policy", "trajectory")
RANKING_FIELDS = ("prompt", "responses")  # responses ordered best first (--from-rankings)


@dataclass(frozen=True)
class Line:
    path: str
    number: int  # 1-based
    raw: bytes

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named or matched by globs, in the order given (each glob sorted)."""
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise FileNotFoundError(f"no input matches {pattern!r}")
        for f in matched:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"input file not found: {f}")
            files.append(f)
    return files


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_lines(files: list[str], start: int = 0, stop: int | None = None) -> Iterator[Line]:
    """Non-blank lines of `files` in order; `start`/`stop` count lines over all files, blank
    ones included, so that partitions of a build cover every line exactly once."""
    index = 0
    for path in files:
        with _open(path) as f:
            for number, raw in enumerate(f, start=1):
                if stop is not None and index >= stop:
                    return
                if index >= start and raw.strip():
                    yield Line(path, number, raw.rstrip(b"\r\n"))
                index += 1


def count_lines(files: list[str]) -> int:
    total = 0
    for path in files:
        with _open(path) as f:
            total += sum(1 for _ in f)
    return total


def parse_json_object(raw: bytes, required: tuple[str, ...]) -> dict:
    """The JSON object on one input line; RecordError says why there is none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"invalid UTF-8 at byte {e.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    missing = [name for name in required if name not in record]
    if missing:
        raise RecordError(f"missing field{'s' if len(missing) > 1 else ''} "
                          + ", ".join(f"'{m}'" for m in missing))
    return record


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A file written under a private temporary name, fsynced and renamed into place when the
    block succeeds (removed when it fails): readers see no file or the whole file, and writers
    racing to write the same content leave that content. The temporary name is unique across
    nodes too (host and pid)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
