"""The POLAR reward as a service: requests in, one float per sequence out.

Two request shapes reach the same model:
- token ids and lengths from NeMo-Aligner's PPO actor (`rewards_for_tokens`): each sequence is
  split into its prompt (found in the reference table) and the response, which is read back as
  text with the actor's tokenizer; the POLAR sequence (prompt, reference, response) is then
  encoded exactly as training and `megatron_polar.score` encode it, truncation rules included;
- full POLAR strings, as POLAR's own client sends them to `/pooling` (`rewards_for_texts`).

Every input is checked before the model runs, and a bad one raises `RequestError` naming its
index in the batch; nothing is scored for a batch that has one. Rewards then pass through the
post-processing (none by default, as POLAR was released).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megatron_polar.config.flags import option
from megatron_polar.data.encoding import RecordError
from megatron_polar.data.tokenizer import REWARD_SEPARATOR, REWARD_TOKEN
from megatron_polar.serving.collective import Collective
from megatron_polar.serving.postprocess import RewardPostprocessor
from megatron_polar.serving.references import ReferenceTable, UnknownPrompt


class RequestError(ValueError):
    """A request the server refuses; the message is sent back to the client."""


@dataclass(frozen=True)
class RequestLimits:
    # sequences in one request (the flag is TritonSettings' --max-batch-size)
    max_batch_size: int = option(256, cli=False)
    max_request_tokens: int = option(  # B x S of a token request; tokens of a text one
        4 * 1024 * 1024, help="largest batch x sequence tokens of one request")
    max_text_bytes: int = option(8 * 1024 * 1024, flag="--max-body-bytes",
                                 help="largest /pooling request body")


class PolarRewardService:
    """Scores requests with a loaded `RewardScorer`; thread-safe (one model call at a time).

    `references` is needed for token requests only; `unknown_prompt_reward`, when set, is the
    reward (after post-processing, unchanged by it) of a sequence whose prompt is not in the
    table, instead of an error."""

    def __init__(self, scorer, references: Optional[ReferenceTable] = None,
                 postprocess: Optional[RewardPostprocessor] = None,
                 unknown_prompt_reward: Optional[float] = None,
                 limits: RequestLimits = RequestLimits(),
                 collective: Optional[Collective] = None):
        self.scorer = scorer
        self.references = references
        self.postprocess = postprocess or RewardPostprocessor()
        self.unknown_prompt_reward = unknown_prompt_reward
        self.limits = limits
        # Model calls go through the collective: one at a time, on every rank of the model.
        self.collective = collective or Collective()
        self.collective.register("rm_score", scorer.score_ids)
        self._count_lock = threading.Lock()
        self.sequences_scored = 0
        self.tokens_scored = 0

    # -- token requests (NeMo-Aligner) -------------------------------------------------------

    def check_token_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
        """Validated (tokens [B, S] int64, lengths [B] int64); RequestError says what is wrong."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        if tokens.dtype.kind not in "iu" or lengths.dtype.kind not in "iu":
            raise RequestError(f"'tokens' and 'sequence_lengths' must be integers, got "
                               f"{tokens.dtype} and {lengths.dtype}")
        if tokens.ndim != 2:
            raise RequestError(f"'tokens' must be [batch, seq], got shape {list(tokens.shape)}")
        if lengths.ndim == 2 and lengths.shape[1] == 1:
            lengths = lengths[:, 0]
        if lengths.ndim != 1 or lengths.shape[0] != tokens.shape[0]:
            raise RequestError(f"'sequence_lengths' must be [batch, 1] with batch "
                               f"{tokens.shape[0]}, got shape {list(np.shape(lengths))}")
        batch, width = tokens.shape
        if batch == 0:
            raise RequestError("empty batch")
        if batch > self.limits.max_batch_size:
            raise RequestError(f"batch of {batch} sequences exceeds the server's limit of "
                               f"{self.limits.max_batch_size}")
        if batch * width > self.limits.max_request_tokens:
            raise RequestError(f"request of {batch}x{width} tokens exceeds the server's limit of "
                               f"{self.limits.max_request_tokens}")
        for i, n in enumerate(lengths.tolist()):
            if not 1 <= n <= width:
                raise RequestError(f"batch index {i}: sequence_lengths {n} outside 1..{width} "
                                   "(the width of 'tokens')")
        return tokens.astype(np.int64, copy=False), lengths.astype(np.int64, copy=False)

    def encode_tokens(self, tokens: np.ndarray, lengths: np.ndarray
                      ) -> list[Optional[list[int]]]:
        """POLAR ids per sequence; None for an unknown prompt when a fallback reward is set."""
        if self.references is None:
            raise RequestError("this server has no reference file (--references): it scores "
                               "POLAR strings on /pooling only")
        tokens, lengths = self.check_token_batch(tokens, lengths)
        actor = self.references.tokenizer
        out: list[Optional[list[int]]] = []
        for i, (row, n) in enumerate(zip(tokens, lengths.tolist())):
            ids = row[:n].tolist()
            try:
                entry, prompt_len = self.references.match(ids)
            except UnknownPrompt:
                if self.unknown_prompt_reward is None:
                    raise RequestError(f"batch index {i}: unknown prompt: no prompt of the "
                                       "reference file starts this sequence (first ids "
                                       f"{ids[:8]})") from None
                out.append(None)
                continue
            try:
                response = actor.response_text(ids[prompt_len:])
            except Exception as e:  # out-of-vocabulary ids, mostly
                raise RequestError(f"batch index {i}: cannot decode the response: {e}") from None
            try:
                out.append(self.scorer.encoder.encode_sequence(entry.prompt, entry.reference,
                                                               response, entry.wrapper))
            except RecordError as e:
                raise RequestError(f"batch index {i}: {e}") from None
        return out

    def rewards_for_tokens(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B] rewards of right-padded rollouts (NeMo-Aligner's `tokens`, lengths)."""
        return self._score(self.encode_tokens(tokens, lengths))

    # -- POLAR strings (/pooling) ------------------------------------------------------------

    def encode_text(self, text: str, index: int = 0) -> list[int]:
        """Ids of one full POLAR string `p SEP ref <|reward|> p SEP cand` (POLAR's client's
        format): [BOS] tok(first half) <|reward|> tok(second half) [REWARD]. A trailing reward
        token written as text is accepted (it is the same id either way). The first
        `<|reward|>` is the separator; other special-token text in either half (a later
        `<|reward|>` included) is data and is removed as in training (docs/data.md), per half
        since the string does not mark where the prompt ends (special text right at a field
        boundary may leave one space more than training would)."""
        if not isinstance(text, str):
            raise RequestError(f"input {index}: expected a string, got {type(text).__name__}")
        enc = self.scorer.encoder
        tok = enc.tok
        reward_text = tok.id_to_piece(tok.reward_token_id) or REWARD_TOKEN
        if text.endswith(reward_text):
            text = text[: -len(reward_text)]
        if REWARD_SEPARATOR not in text:
            raise RequestError(f"input {index}: a POLAR string has a {REWARD_SEPARATOR} "
                               "between the reference and the candidate; found none")
        halves = [tok.remove_special_text(h) for h in text.split(REWARD_SEPARATOR, 1)]
        for half in halves:
            special = tok.special_text(half)
            if special is not None:
                raise RequestError(f"input {index}: special-token text {special!r} remains "
                                   "after the special tokens were removed")
        ids = ([tok.bos_id] + tok.encode(halves[0]) + [tok.separator_id]
               + tok.encode(halves[1]) + [tok.reward_token_id])
        if len(ids) > enc.cfg.max_length:
            raise RequestError(f"input {index}: {len(ids)} tokens exceed the server's "
                               f"--max-length {enc.cfg.max_length}; POLAR's client truncates "
                               "to its max_length before sending")
        return ids

    def rewards_for_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.score_texts(texts)[0]

    def score_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """(float32 [B] rewards, tokens scored) of full POLAR strings."""
        if not isinstance(texts, (list, tuple)) or not texts:
            raise RequestError("'input' must be a non-empty list of strings (or one string)")
        if len(texts) > self.limits.max_batch_size:
            raise RequestError(f"batch of {len(texts)} inputs exceeds the server's limit of "
                               f"{self.limits.max_batch_size}")
        seqs = [self.encode_text(t, i) for i, t in enumerate(texts)]
        if sum(map(len, seqs)) > self.limits.max_request_tokens:
            raise RequestError(f"request of {sum(map(len, seqs))} tokens exceeds the server's "
                               f"limit of {self.limits.max_request_tokens}")
        return self._score(seqs), sum(map(len, seqs))

    # -- the model ---------------------------------------------------------------------------

    def _score(self, seqs: list[Optional[list[int]]]) -> np.ndarray:
        known = [s for s in seqs if s is not None]
        raw = np.zeros(0, dtype=np.float64)
        if known:
            raw = np.asarray(self.collective.run("rm_score", known), dtype=np.float64)
            with self._count_lock:
                self.sequences_scored += len(known)
                self.tokens_scored += sum(map(len, known))
        processed = iter(self.postprocess(raw)) if known else iter(())
        return np.array([next(processed) if s is not None else self.unknown_prompt_reward
                         for s in seqs], dtype=np.float32)

    def stats(self) -> dict:
        return {"sequences_scored": self.sequences_scored, "tokens_scored": self.tokens_scored,
                "postprocess": self.postprocess.state(),
                "references": len(self.references) if self.references else 0}
