"""POLAR's sequence format and truncation (docs/format.md), as the released trainer applies them.

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
- chat-message lists keep only their contents, joined with "\\n" (no template);
- special-token text inside a field ("<s>", "<|reward|>", ...) is split out and dropped, as
  the released tokenizer's encode and `decode(skip_special_tokens=True)` do; a record whose
  joined text forms one (with the pretrain wrapper, a prompt ending in "<s" and a reference
  starting with ">") is rejected, since text never yields a special id.

That costs 7 encodes and 4 decodes per triplet. When the tokenizer provably round-trips text
(`PolarTokenizer.round_trips`: identity normalisation and byte fallback) and the token bounds of
the fields (`PolarTokenizer.token_bound`) show that nothing can be cut, every decode would give
back its text unchanged, so the fast path encodes only the three halves; its output is the
same ids. Any other record (and any record with special-token text) takes the exact path.
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
        # Records whose fields had special-token text removed (build_triplets' meta.json).
        self.special_text_records = 0

    def _keep_first(self, text: str) -> tuple[str, int]:
        """(kept text, kept length counting the field's own BOS). Like the released trainer we
        always go through decode, which also applies the tokenizer's normalisation."""
        ids = self.tok.encode(text)[: self.cfg.max_response_length - 1]
        return self.tok.decode(ids), len(ids) + 1

    def _half(self, prompt: str, response: str, wrapper: str) -> list[int]:
        sep = "" if wrapper == "pretrain" or not response else "\n"
        text = prompt + sep + response
        special = self.tok.special_text(text)
        if special is not None:
            raise RecordError(f"special-token text {special!r} formed where the fields join "
                              "(it would encode as a special id)")
        ids = self.tok.encode(text)
        if not self.tok.never_from_text.isdisjoint(ids):  # other text mapped to them
            raise RecordError(f"the text encodes to special ids "
                              f"{sorted(self.tok.never_from_text.intersection(ids))}")
        return ids

    def _count_special_text(self, texts) -> None:
        if any(self.tok.special_text(t) for t in texts):
            self.special_text_records += 1

    def sequence(self, prompt: str, reference: str, candidate: str, wrapper: str,
                 first_half: list[int] | None = None) -> list[int]:
        """Ids of one POLAR sequence from already-truncated texts (`first_half`: the ids of
        prompt + reference, when already known)."""
        if first_half is None:
            first_half = self._half(prompt, reference, wrapper)
        return ([self.tok.bos_id] + first_half + [self.tok.separator_id]
                + self._half(prompt, candidate, wrapper) + [self.tok.reward_token_id])

    def encode_sequence(self, prompt: Any, reference: Any, candidate: Any,
                        wrapper: str = "sft") -> list[int]:
        """Ids of one POLAR sequence (p, ref, candidate), for scoring: the released rules with
        this sequence's own prompt budget. The candidate may be empty or equal the reference."""
        if wrapper not in WRAPPERS:
            raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
        p, ref, cand = (field_text(v, n) for v, n in ((prompt, "prompt"),
                                                       (reference, "reference"),
                                                       (candidate, "candidate")))
        (ref, n_ref), (cand, n_cand) = self._keep_first(ref), self._keep_first(cand)
        p_ids = self.tok.encode(p)
        budget = (self.cfg.max_length - RESERVED_TOKENS - n_ref - n_cand) // 2
        if budget < 1:
            raise RecordError(f"over-long record: responses leave no room for the prompt "
                              f"within max_length {self.cfg.max_length}")
        p = self.tok.decode(p_ids[-budget:] if len(p_ids) + 1 > budget else p_ids)
        return self.sequence(p, ref, cand, wrapper)

    def encode(self, prompt: Any, reference: Any, chosen: Any, rejected: Any,
               wrapper: str = "sft") -> tuple[list[int], list[int]]:
        if wrapper not in WRAPPERS:
            raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
        if self.tok.round_trips:
            fast = self._encode_untruncated(prompt, reference, chosen, rejected, wrapper)
            if fast is not None:
                return fast
        return self._encode_exact(prompt, reference, chosen, rejected, wrapper)

    def _encode_untruncated(self, prompt: Any, reference: Any, chosen: Any, rejected: Any,
                            wrapper: str) -> tuple[list[int], list[int]] | None:
        """The fast path: None unless the bounds prove that `_encode_exact` would keep every
        field whole and decode each back to itself; then the same ids from 3 encodes."""
        try:
            texts = [field_text(v, n) for v, n in ((prompt, "prompt"), (reference, "reference"),
                                                   (chosen, "chosen"), (rejected, "rejected"))]
        except RecordError:
            return None  # the exact path raises it, in its order
        if any(self.tok.special_text(t) for t in texts):
            return None
        bounds = [self.tok.token_bound(t) for t in texts]
        if None in bounds:
            return None
        b_p, b_ref, b_pos, b_neg = bounds
        # No response is cut: each keeps up to max_response_length tokens with its own BOS.
        if max(b_ref, b_pos, b_neg) > self.cfg.max_response_length - 1:
            return None
        # The budget from the bounds (each field counted with its BOS) is at most the true
        # budget, so a prompt that fits it with its BOS is kept whole (and budget >= 1).
        room = self.cfg.max_length - RESERVED_TOKENS - (b_ref + 1)
        budget = min((room - (b_pos + 1)) // 2, (room - (b_neg + 1)) // 2)
        if b_p + 1 > budget:
            return None
        p, ref, pos, neg = texts
        self._check_responses(ref, pos, neg)
        first_half = self._half(p, ref, wrapper)
        return (self.sequence(p, ref, pos, wrapper, first_half),
                self.sequence(p, ref, neg, wrapper, first_half))

    @staticmethod
    def _check_responses(ref: str, pos: str, neg: str) -> None:
        if not pos.strip() or not neg.strip():
            raise RecordError("empty response: 'chosen' and 'rejected' must contain text")
        if ref == neg:
            raise RecordError("the reference is identical to the rejected response")

    def _encode_exact(self, prompt: Any, reference: Any, chosen: Any, rejected: Any,
                      wrapper: str) -> tuple[list[int], list[int]]:
        """The released trainer's steps: measure, truncate and decode each field, then encode
        the halves."""
        texts = [field_text(v, n) for v, n in ((prompt, "prompt"), (reference, "reference"),
                                                 (chosen, "chosen"), (rejected, "rejected"))]
        self._count_special_text(texts)
        p = texts[0]
        (ref, n_ref), (pos, n_pos), (neg, n_neg) = map(self._keep_first, texts[1:])
        self._check_responses(ref, pos, neg)
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
