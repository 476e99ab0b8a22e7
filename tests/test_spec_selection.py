"""Layer-spec choice and FP8 guard rails."""

import pytest

from megatron_polar.model.attention import PackedCoreAttention
from megatron_polar.model.config import FP8Config, ModelRunConfig
from megatron_polar.model.presets import get_preset
from megatron_polar.model.spec import (FP8UnavailableError, build_layer_spec, resolve_use_te,
                                       transformer_engine_available)


@pytest.mark.parametrize("te,cuda,expected", [(True, True, True), (True, False, False),
                                              (False, True, False), (False, False, False)])
def test_te_spec_only_with_te_and_cuda(te, cuda, expected):
    assert resolve_use_te(ModelRunConfig(), te_available=te, cuda_available=cuda,
                          hopper=cuda) is expected


@pytest.mark.parametrize("te,cuda,hopper,missing", [
    (False, True, True, "Transformer Engine"),
    (True, False, False, "a CUDA GPU"),
    (True, True, False, "a Hopper"),
    (False, False, False, "Transformer Engine, a CUDA GPU"),
])
def test_fp8_without_te_or_gpu_is_a_clear_error(te, cuda, hopper, missing):
    run = ModelRunConfig(fp8=FP8Config(format="hybrid"))
    with pytest.raises(FP8UnavailableError, match=f"FP8 \\(hybrid\\) needs {missing}"):
        resolve_use_te(run, te_available=te, cuda_available=cuda, hopper=hopper)


def test_fp8_with_te_on_hopper_uses_te():
    run = ModelRunConfig(fp8=FP8Config(format="hybrid", recipe="delayed", amax_history_len=16))
    assert resolve_use_te(run, te_available=True, cuda_available=True, hopper=True)
    with pytest.raises(FP8UnavailableError, match="needs the Transformer Engine layer spec"):
        resolve_use_te(ModelRunConfig(fp8=FP8Config(format="e4m3"), use_transformer_engine=False),
                       te_available=True, cuda_available=True, hopper=True)


def test_fp8_settings_are_validated():
    with pytest.raises(ValueError, match="fp8 format"):
        FP8Config(format="e5m2")
    with pytest.raises(ValueError, match="fp8 recipe"):
        FP8Config(format="hybrid", recipe="nope")


def test_this_machine_fp8_build_fails_before_any_model_is_made(ctx1):
    from megatron_polar.training.step import build_model_chunks

    assert not transformer_engine_available()  # CPU CI has no TE
    run = ModelRunConfig(fp8=FP8Config(format="hybrid"))
    with pytest.raises(FP8UnavailableError, match="Transformer Engine"):
        build_model_chunks(get_preset("tiny"), run, ctx1)


def test_local_spec_uses_packed_attention():
    spec = build_layer_spec(use_te=False)
    assert spec.submodules.self_attention.submodules.core_attention is PackedCoreAttention


def test_requesting_te_without_it_is_an_error():
    with pytest.raises(RuntimeError, match="Transformer Engine was requested but is not installed"):
        resolve_use_te(ModelRunConfig(use_transformer_engine=True), te_available=False,
                       cuda_available=True, hopper=True)


@pytest.mark.parametrize("change", [dict(context_parallel_size=2),
                                    dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                         tp_comm_overlap=True)])
def test_context_parallel_and_tp_comm_overlap_need_te_on_a_gpu(change):
    run = ModelRunConfig(**change)
    with pytest.raises(RuntimeError, match="needs Transformer Engine on a CUDA GPU"):
        resolve_use_te(run, te_available=False, cuda_available=False, hopper=False)
    with pytest.raises(RuntimeError, match="it is disabled"):
        resolve_use_te(ModelRunConfig(**change, use_transformer_engine=False),
                       te_available=True, cuda_available=True, hopper=True)
    assert resolve_use_te(run, te_available=True, cuda_available=True, hopper=True)
