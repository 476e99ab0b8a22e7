"""A synthetic policy-discrimination task: POLAR pre-training in miniature.

Each "policy" is a token distribution: uniform over its own set of favourite tokens. A
response is a handful of distinct tokens drawn from it (no repeats, so a candidate token seen
earlier can only have come from the prompt or the reference). A triplet takes a prompt, a reference and a positive
from policy A and a negative from policy B != A, laid out in POLAR's sequence format
([BOS] p ref <|reward|> p cand [REWARD]). Telling A from B by comparing the candidate with the
reference is the skill POLAR pre-training teaches; evaluating on policies never seen in
training checks that the model learnt the comparison, not the policies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_polar.model.presets import ModelPreset

FIRST_CONTENT_ID = 4  # ids below are left to BOS/EOS/pad and the reward separator


@dataclass
class SyntheticTask:
    """Token ids and policy shapes for the synthetic task (all ids < preset vocab)."""

    vocab: int  # content tokens are FIRST_CONTENT_ID .. FIRST_CONTENT_ID + vocab - 1
    favourites: int = 16
    prompt_len: tuple[int, int] = (4, 12)
    response_len: tuple[int, int] = (6, 12)
    bos_id: int = 1
    separator_id: int = 3  # stands in for <|reward|>
    reward_id: int = 0  # set from the preset

    @classmethod
    def for_preset(cls, preset: ModelPreset, **kw) -> "SyntheticTask":
        vocab = min(preset.vocab_size - FIRST_CONTENT_ID - 1, 200)
        return cls(vocab=vocab, bos_id=preset.bos_token_id, reward_id=preset.reward_token_id, **kw)

    def make_policies(self, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Each policy: its favourite token ids."""
        return [rng.choice(self.vocab, self.favourites, replace=False) + FIRST_CONTENT_ID
                for _ in range(n)]

    def _sample(self, policy: np.ndarray, rng: np.random.Generator) -> list[int]:
        n = min(int(rng.integers(*self.response_len)), len(policy))
        return rng.choice(policy, n, replace=False).tolist()

    def sequence(self, prompt: list[int], ref: list[int], cand: list[int]) -> list[int]:
        return [self.bos_id, *prompt, *ref, self.separator_id, *prompt, *cand, self.reward_id]

    def pairs(self, policies: list[np.ndarray] | None, n: int, seed: int):
        """n (s+, s-) token-id pairs over the given policies; `None` draws two fresh policies
        for every triplet (an unbounded pool: nothing to memorise, only the comparison)."""
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            if policies is None:
                pa, pb = self.make_policies(2, rng)
            else:
                a, b = rng.choice(len(policies), 2, replace=False)
                pa, pb = policies[a], policies[b]
            prompt = (rng.integers(0, self.vocab, int(rng.integers(*self.prompt_len)))
                      + FIRST_CONTENT_ID).tolist()
            ref, pos, neg = self._sample(pa, rng), self._sample(pa, rng), self._sample(pb, rng)
            out.append((self.sequence(prompt, ref, pos), self.sequence(prompt, ref, neg)))
        return out
