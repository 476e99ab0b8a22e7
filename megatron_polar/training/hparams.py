"""POLAR's hyperparameter laws (paper, section 4; docs/training.md, "Hyperparameter laws").

    LR    = 0.0002306 * N^0.01125 * D_p^-0.66587 * D_rm^0.33916
    batch = 31.9032   * N^0.06944 * D_rm^0.52997          (triplets per optimizer step)

N is the model size, D_p the tokens the base LLM was pre-trained on, D_rm the reward model's
pre-training tokens. The paper calls the units "millions", but its reported settings (1.8B:
LR 1.4e-5, batch 1940; 7B: LR 1.67e-5, batch 4343) only come out of the fits with binary units:
N in 2^20 parameters and D in 2^30 tokens, N being the nominal model size (1.8e9, 7e9). With
decimal millions/billions the batch would be 2021 / 4525. We use the units that reproduce the
paper; `tests/test_hparams.py` pins both reported settings.
"""

from __future__ import annotations

from dataclasses import dataclass

PARAM_UNIT = 2 ** 20
TOKEN_UNIT = 2 ** 30


@dataclass(frozen=True)
class PolarHparams:
    lr: float
    global_batch_size: int  # triplets per step

    def describe(self, n_params: float, base_tokens: float, rm_tokens: float) -> str:
        return (f"hyperparameter laws: N={n_params:.3g} params, D_p={base_tokens:.3g} tokens, "
                f"D_rm={rm_tokens:.3g} tokens -> lr {self.lr:.3g}, global batch "
                f"{self.global_batch_size} triplets")


def polar_lr(n_params: float, base_tokens: float, rm_tokens: float) -> float:
    n, dp, drm = n_params / PARAM_UNIT, base_tokens / TOKEN_UNIT, rm_tokens / TOKEN_UNIT
    return 0.0002306 * n ** 0.01125 * dp ** -0.66587 * drm ** 0.33916


def polar_batch_size(n_params: float, rm_tokens: float) -> float:
    n, drm = n_params / PARAM_UNIT, rm_tokens / TOKEN_UNIT
    return 31.9032 * n ** 0.06944 * drm ** 0.52997


def polar_hparams(n_params: float, base_tokens: float, rm_tokens: float) -> PolarHparams:
    for name, value in (("model parameters", n_params), ("--base-tokens", base_tokens),
                        ("--rm-tokens", rm_tokens)):
        if not value > 0:
            raise ValueError(f"{name} must be positive for --auto-hparams, got {value}")
    return PolarHparams(lr=polar_lr(n_params, base_tokens, rm_tokens),
                        global_batch_size=max(1, round(polar_batch_size(n_params, rm_tokens))))
