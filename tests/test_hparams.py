"""The paper's hyperparameter laws reproduce its reported settings."""

import pytest

from megatron_polar.model.presets import get_preset
from megatron_polar.training.hparams import polar_batch_size, polar_hparams, polar_lr


@pytest.mark.parametrize("preset,base,rm,lr,digits,batch", [
    ("internlm2_5-1_8b", 2.5e12, 0.94e12, 1.4e-5, 6, 1940),  # LR reported to 2 digits
    ("polar-7b", 4.0e12, 3.6e12, 1.67e-5, 7, 4343),  # and to 3
])
def test_laws_reproduce_the_paper(preset, base, rm, lr, digits, batch):
    n = get_preset(preset).nominal_parameters
    hp = polar_hparams(n, base, rm)
    assert round(hp.lr, digits) == pytest.approx(lr, rel=1e-9)
    assert hp.global_batch_size == batch


def test_laws_move_the_way_the_fits_say():
    assert polar_lr(1.8e9, 2.5e12, 2e12) > polar_lr(1.8e9, 2.5e12, 1e12)  # more RM data
    assert polar_lr(1.8e9, 5e12, 1e12) < polar_lr(1.8e9, 2.5e12, 1e12)  # better base model
    assert polar_batch_size(7e9, 1e12) > polar_batch_size(1.8e9, 1e12)
    with pytest.raises(ValueError, match="--rm-tokens"):
        polar_hparams(1.8e9, 2.5e12, 0)


def test_auto_hparams_flags(tmp_path):
    from megatron_polar.training.arguments import parse_train_args

    args = parse_train_args(["--data-path", "x", "--micro-batch-tokens", "1024",
                             "--train-iters", "1", "--auto-hparams", "--base-tokens", "2.5e12",
                             "--rm-tokens", "0.94e12"])
    assert args.lr is None and args.global_batch_size is None  # filled in by the trainer
    with pytest.raises(SystemExit):
        parse_train_args(["--data-path", "x", "--micro-batch-tokens", "1024",
                          "--train-iters", "1", "--auto-hparams"])
