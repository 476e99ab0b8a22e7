"""Cleaning a sampled trajectory (POLAR paper, appendix A.1): repetition loops and incomplete tails.

Two cuts, at most one per trajectory:

- loop: the trajectory ends in a periodic run of token ids (period p <= `max_period`, at
  least `min_repeats` full periods and `min_loop_tokens` tokens). Everything before the run is
  kept, and the run's first `keep_repeats` periods with it: the paper keeps the loop-prone start
  so the reward model sees what a looping policy looks like, without thousands of copies.
- tail: generation stopped on the length limit (no EOS) and no loop was cut. The text is cut
  after its last sentence end, so no trajectory ends mid-sentence. If that would leave nothing,
  the trajectory is kept whole.

Loops are found on ids (exact, cheap with numpy); sentence ends on the decoded text, where
punctuation is visible whatever the tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

MAX_PERIOD = 256
MIN_REPEATS = 3
MIN_LOOP_TOKENS = 32
KEEP_REPEATS = 2

# ASCII sentence ends count only before whitespace or the end ("3.14", "e.g.x" are not ends),
# optionally followed by closing quotes/brackets; CJK full-width ends need no space after them;
# a newline ends a line of code, a list item or a heading.
_SENTENCE_END = re.compile(
    r"[.!?\u2026]+[\"'\u201d\u2019)\]]*(?=\s|$)"
    r"|[\u3002\uff01\uff1f\uff1b\u2026]+[\u201d\u2019\u300d\u300f\uff09]*"
    r"|\n")


@dataclass(frozen=True)
class Loop:
    start: int   # index of the first token of the periodic run
    period: int
    length: int  # tokens from start to the end of the trajectory


class Truncated(NamedTuple):
    text: str
    kind: Optional[str]  # None, "loop" or "tail"


def find_loop(ids: Sequence[int], max_period: int = MAX_PERIOD, min_repeats: int = MIN_REPEATS,
              min_loop_tokens: int = MIN_LOOP_TOKENS) -> Optional[Loop]:
    """The longest periodic run at the end of `ids` that qualifies as a loop, or None.

    For a period p, ids[i] == ids[i - p] over the last r positions means the last r + p tokens
    repeat with period p. Among qualifying periods the longest run wins (the loop that started
    earliest), ties going to the smallest period (the loop's unit rather than a multiple of it).
    """
    a = np.asarray(ids, dtype=np.int64)
    n = len(a)
    best: Optional[Loop] = None
    for p in range(1, min(max_period, n // min_repeats) + 1):
        mismatches = np.flatnonzero(a[p:] != a[:-p])
        run = (n - p) - (mismatches[-1] + 1 if len(mismatches) else 0)
        length = run + p
        if length >= min_repeats * p and length >= min_loop_tokens:
            if best is None or length > best.length:
                best = Loop(start=n - length, period=p, length=length)
    return best


def cut_loop(ids: Sequence[int], keep_repeats: int = KEEP_REPEATS,
             **find_args) -> Optional[list[int]]:
    """`ids` up to the end of the loop's first `keep_repeats` periods, or None without a loop."""
    loop = find_loop(ids, **find_args)
    if loop is None:
        return None
    return list(ids[: loop.start + keep_repeats * loop.period])


def cut_incomplete_tail(text: str) -> Optional[str]:
    """`text` up to its last sentence end (trailing whitespace dropped), or None when that
    removes nothing or would leave no text."""
    last = None
    for last in _SENTENCE_END.finditer(text):
        pass
    if last is None:
        return None
    kept = text[: last.end()].rstrip()
    if not kept.strip() or kept == text.rstrip():
        return None
    return kept


def truncate(ids: Sequence[int], stopped: bool,
             decode: Callable[[Sequence[int]], str]) -> Truncated:
    """The text of a generation (`ids` without EOS; `stopped`: it ended on EOS) after the loop
    or tail cut, and which cut was made."""
    kept = cut_loop(ids)
    if kept is not None:
        # A cut between the bytes of one character decodes to U+FFFD: drop the broken piece.
        return Truncated(decode(kept).rstrip("\ufffd"), "loop")
    text = decode(ids)
    if not stopped:
        cut = cut_incomplete_tail(text)
        if cut is not None:
            return Truncated(cut, "tail")
    return Truncated(text, None)
