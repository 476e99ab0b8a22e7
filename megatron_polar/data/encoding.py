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

    def _keep_first(self, text: str) -> tuple[str, int]:
        """(kept text, kept length counting the field's own BOS). Like the released trainer we
        always go through decode, which also applies the tokenizer's normalisation."""
        ids = self.tok.encode(text)[: self.cfg.max_response_length - 1]
        return self.tok.decode(ids), len(ids) + 1

    def _half(self, prompt: str, response: str, wrapper: str) -> list[int]:
        sep = "" if wrapper == "pretrain" or not response else "\n"
        return self.tok.encode(prompt + sep + response)

    def sequence(self, prompt: str, reference: str, candidate: str, wrapper: str,
                 first_half: list[int] | None = None) -> list[int]:
        """Ids of one POLAR sequence from already-truncated texts (`first_half`: the ids of
        prompt + reference, when already known)."""
        if first_half is None:
            first_half = self._half(prompt, reference, wrapper)
        return ([self.tok.bos_id] + first_half + [self.tok.separator_id]
                + self._half(prompt, candidate, wrapper) + [self.tok.reward_token_id])

    def encode(self, prompt: Any, reference: Any, chosen: Any, rejected: Any,
               wrapper: str = "sft") -> tuple[list[int], list[int]]:
        if wrapper not in WRAPPERS:
            raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
        p = field_text(prompt, "prompt")
        (ref, n_ref), (pos, n_pos), (neg, n_neg) = (
            self._keep_first(field_text(v, n)) for v, n in
            ((reference, "reference"), (chosen, "chosen"), (rejected, "rejected")))
        if not pos.strip() or not neg.strip():
            raise RecordError("empty response: 'chosen' and 'rejected' must contain text")
        if ref == neg:
            raise RecordError("the reference is identical to the rejected response")
        p_ids = self.tok.encode(p)
        room = self.cfg.max_length - RESERVED_TOKENS
        budget = min((room - n_ref - n_pos) // 2, (room - n_ref - n_neg) // 2)
        if budget < 1:
            raise RecordError(f"over-long record: responses leave no room for the prompt "
                              f"within max_length {self.cfg.max_length}")
        # [BOS] + prompt keeps its last `budget` ids; the BOS is the first to go.
        p = self.tok.decode(p_ids[-budget:] if len(p_ids) + 1 > budget else p_ids)
        first_half = self._half(p, ref, wrapper)  # shared by s+ and s-: encoded once
        return (self.sequence(p, ref, pos, wrapper, first_half),
                self.sequence(p, ref, neg, wrapper, first_half))
