"""Reward post-processing between the model and the PPO actor.

POLAR's released recipes use the raw reward, so the default is to change nothing. PPO users who
want a scale they know can pick:

- `fixed`: (r - mean) / std with constants they measured (e.g. on a rollout sample);
- `running`: (r - mean) / std with the mean and std of every reward served so far (Welford's
  update, one pass, numerically stable); the statistics are updated with a batch *before* it is
  normalised, so the first batch is normalised by its own statistics;
- and, after either, clipping to [-clip, clip].
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_polar.config.flags import option

NORMALIZATIONS = ("none", "fixed", "running")


@dataclass(frozen=True)
class PostprocessConfig:
    # Flags --reward-normalization, --reward-mean, ... (serving/__main__.py).
    normalization: str = option("none", choices=NORMALIZATIONS)
    mean: float = option(0.0, help="for 'fixed'")
    std: float = option(1.0, help="for 'fixed'")
    clip: Optional[float] = option(None, help="clip rewards to [-C, C] after normalisation")
    eps: float = option(1e-6, cli=False)  # floor of the running std (a constant reward stream)

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"reward normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.normalization!r}")
        if self.normalization == "fixed" and not self.std > 0:
            raise ValueError(f"--reward-std must be > 0, got {self.std}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"--reward-clip must be > 0, got {self.clip}")


class RewardPostprocessor:
    """Applies a `PostprocessConfig` to batches of raw rewards; thread-safe (the HTTP and
    Triton front ends share one)."""

    def __init__(self, config: PostprocessConfig = PostprocessConfig()):
        self.config = config
        self._lock = threading.Lock()
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the mean

    @property
    def running_mean(self) -> float:
        return self._mean

    @property
    def running_std(self) -> float:
        return math.sqrt(self._m2 / self.count) if self.count else 0.0

    def _update(self, rewards: np.ndarray) -> None:
        for r in rewards.astype(np.float64).ravel():
            self.count += 1
            delta = r - self._mean
            self._mean += delta / self.count
            self._m2 += delta * (r - self._mean)

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        cfg = self.config
        out = np.asarray(rewards, dtype=np.float64)
        if cfg.normalization == "fixed":
            out = (out - cfg.mean) / cfg.std
        elif cfg.normalization == "running":
            with self._lock:
                self._update(out)
                mean, std = self._mean, max(self.running_std, cfg.eps)
            out = (out - mean) / std
        if cfg.clip is not None:
            out = np.clip(out, -cfg.clip, cfg.clip)
        return out.astype(np.float32)

    def state(self) -> dict:
        """What the server reports on /health: the configuration and the running statistics."""
        return {"normalization": self.config.normalization, "clip": self.config.clip,
                "count": self.count, "running_mean": self._mean, "running_std": self.running_std}
