"""POLAR's sequence format and truncation rules (POLAR-SPEC.md), as the released trainer applies them.

    s = [BOS] tok(p SEP ref) <|reward|> tok(p SEP cand) [REWARD]      SEP = "\\n" ("" for pretrain)

The released trainer measures and truncates each field on its own ids (each counted with its
BOS, as its tokenizer adds one), decodes the kept ids back to text, then tokenizes the joined
text; the `<|reward|>` piece splits that text in two, so the halves are encoded separately and
the separator id goes between them. We do the same, so our ids match what POLAR models were
trained on:

- a response (reference, chosen, rejected) keeps its first `max_response_length` tokens;
- the prompt appears twice and keeps its LAST `(max_length - 4 - |ref| - |cand|) // 2` tokens,
  the smaller budget of the two sequences of a triplet, so s+ and s- share one prompt;
- the "\\n" after the prompt is left out when the response that follows is empty;
- chat-message lists keep only their contents, joined with "\\n" (no template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_polar.data.tokenizer import PolarTokenizer

# <|reward|>, the reward token and the two separators fit inside max_length (released rule).
RESERVED_TOKENS = 4
WRAPPERS = ("sft", "pretrain")


class RecordError(ValueError):
    """A record that cannot be encoded; the message is the reason written to the reject file."""


@dataclass(frozen=True)
class EncodingConfig:
    max_length: int = 16384
    max_response_length: int = 4096

    def __post_init__(self):
        if self.max_response_length < 2 or self.max_length <= RESERVED_TOKENS + 2:
            raise ValueError("max_length / max_response_length too small")


def field_text(value: Any, name: str) -> str:
    """A field as text: a string, or a list of chat messages whose contents are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise RecordError(f"field '{name}': message {i} has no string 'content'")
            parts.append(message["content"])
        return "\n".join(parts)
    raise RecordError(f"field '{name}' must be a string or a list of messages, "
                      f"got {type(value).__name__}")


class TripletEncoder:
    """Turns (prompt, reference, chosen, rejected) into the ids of s+ and s-."""

    def __init__(self, tokenizer: PolarTokenizer, config: EncodingConfig = EncodingConfig()):
        self.tok = tokenizer
        self.cfg = config

    def _keep_first(self, text: str) -> str:
        # The budget counts the field's own BOS. Like the released trainer we always go through
        # decode, which also applies the tokenizer's normalisation to untruncated text.
        return self.tok.decode(self.tok.encode(text)[: self.cfg.max_response_length - 1])

    def sequence(self, prompt: str, reference: str, candidate: str, wrapper: str) -> list[int]:
        """Ids of one POLAR sequence from already-truncated texts."""
        sep = "" if wrapper == "pretrain" else "\n"
        first = prompt + (sep if reference else "") + reference
        second = prompt + (sep if candidate else "") + candidate
        return ([self.tok.bos_id] + self.tok.encode(first) + [self.tok.separator_id]
                + self.tok.encode(second) + [self.tok.reward_token_id])

    def encode(self, prompt: Any, reference: Any, chosen: Any, rejected: Any,
               wrapper: str = "sft") -> tuple[list[int], list[int]]:
        if wrapper not in WRAPPERS:
            raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
        p = field_text(prompt, "prompt")
        ref, pos, neg = (self._keep_first(field_text(v, n)) for v, n in
                         ((reference, "reference"), (chosen, "chosen"), (rejected, "rejected")))
        if not pos.strip() or not neg.strip():
            raise RecordError("empty response: 'chosen' and 'rejected' must contain text")
        if ref == neg:
            raise RecordError("the reference is identical to the rejected response")
        p_ids = self.tok.encode(p)
        n_ref, n_pos, n_neg = (len(self.tok.encode(t)) + 1 for t in (ref, pos, neg))
        room = self.cfg.max_length - RESERVED_TOKENS
        budget = min((room - n_ref - n_pos) // 2, (room - n_ref - n_neg) // 2)
        if budget < 1:
            raise RecordError(f"over-long record: responses leave no room for the prompt "
                              f"within max_length {self.cfg.max_length}")
        # [BOS] + prompt keeps its last `budget` ids; the BOS is the first to go.
        p = self.tok.decode(p_ids[-budget:] if len(p_ids) + 1 > budget else p_ids)
        return self.sequence(p, ref, pos, wrapper), self.sequence(p, ref, neg, wrapper)
