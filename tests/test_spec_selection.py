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
    from megatron_polar.runtime.chunks import build_model_chunks

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


def test_tp_comm_overlap_needs_te_on_a_gpu():
    change = dict(tensor_model_parallel_size=2, sequence_parallel=True, tp_comm_overlap=True)
    run = ModelRunConfig(**change)
    with pytest.raises(RuntimeError, match="needs Transformer Engine on a CUDA GPU"):
        resolve_use_te(run, te_available=False, cuda_available=False, hopper=False)
    with pytest.raises(RuntimeError, match="it is disabled"):
        resolve_use_te(ModelRunConfig(**change, use_transformer_engine=False),
                       te_available=True, cuda_available=True, hopper=True)
    assert resolve_use_te(run, te_available=True, cuda_available=True, hopper=True)


@pytest.mark.parametrize("te,cuda,impl", [(True, True, None), (True, True, True),
                                          (False, False, None), (True, True, False)])
def test_context_parallelism_is_refused_with_or_without_te(te, cuda, impl):
    run = ModelRunConfig(context_parallel_size=2, use_transformer_engine=impl)
    with pytest.raises(NotImplementedError, match="not implemented for POLAR") as err:
        resolve_use_te(run, te_available=te, cuda_available=cuda, hopper=cuda)
    assert isinstance(err.value, RuntimeError)  # the trainer turns RuntimeErrors into refusals
    assert "reward tokens" in str(err.value) and "--sequence-parallel" in str(err.value)


def test_this_machine_refuses_context_parallelism_before_any_model_is_made(ctx1):
    from megatron_polar.runtime.chunks import build_model_chunks

    with pytest.raises(NotImplementedError, match="context-parallel-size 2"):
        build_model_chunks(get_preset("tiny"), ModelRunConfig(context_parallel_size=2), ctx1)


def fp8_run(recipe):
    return ModelRunConfig(fp8=FP8Config(format="hybrid", recipe=recipe))


@pytest.mark.parametrize("capability", [(9, 0), (8, 9)])
def test_mxfp8_is_refused_before_blackwell(capability):
    hopper = capability >= (9, 0)
    with pytest.raises(FP8UnavailableError,
                       match=r"mxfp8 .* needs a Blackwell GPU \(compute capability 10.x\)"
                       if hopper else "a Hopper"):
        resolve_use_te(fp8_run("mxfp8"), te_available=True, cuda_available=True,
                       capability=capability, te_version="2.8.0")
    # told only "Hopper or newer": mxfp8 is refused too, with the capability unknown
    with pytest.raises(FP8UnavailableError, match="compute capability 9.0"):
        resolve_use_te(fp8_run("mxfp8"), te_available=True, cuda_available=True, hopper=True)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_every_recipe_runs_on_blackwell_with_a_recent_te(recipe):
    assert resolve_use_te(fp8_run(recipe), te_available=True, cuda_available=True,
                          capability=(10, 0), te_version="2.8.0")


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_hopper_recipes(recipe):
    assert resolve_use_te(fp8_run(recipe), te_available=True, cuda_available=True,
                          capability=(9, 0), te_version="2.8.0")


@pytest.mark.parametrize("recipe,old_te", [("tensorwise", "2.1.0"), ("blockwise", "2.2.0"),
                                           ("mxfp8", "2.0.0")])
def test_recipes_need_the_te_megatron_builds_them_with(recipe, old_te):
    with pytest.raises(FP8UnavailableError, match="needs Transformer Engine >= "):
        resolve_use_te(fp8_run(recipe), te_available=True, cuda_available=True,
                       capability=(10, 0), te_version=old_te)
    # delayed scaling works with any TE megatron supports
    assert resolve_use_te(fp8_run("delayed"), te_available=True, cuda_available=True,
                          capability=(9, 0), te_version=old_te)


def test_gradient_accumulation_fusion_is_off_on_this_machine(caplog):
    import torch

    from megatron_polar.model import config as config_module
    from megatron_polar.model.config import (build_transformer_config,
                                             use_gradient_accumulation_fusion,
                                             wgrad_fusion_kernel_available)

    assert not torch.cuda.is_available() and not wgrad_fusion_kernel_available()  # CPU CI
    for use_te in (False, True):
        cfg = build_transformer_config(get_preset("tiny"), ModelRunConfig(), use_te=use_te)
        assert cfg.gradient_accumulation_fusion is False
    # TE on a GPU without apex's kernel: off, said once
    config_module._logged_wgrad_fusion_off = False
    with caplog.at_level("WARNING", logger="megatron_polar.model.config"):
        assert not use_gradient_accumulation_fusion(True, True)
        assert not use_gradient_accumulation_fusion(True, True)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "fused_weight_gradient_mlp_cuda" in caplog.records[0].message
    assert use_gradient_accumulation_fusion(True, True, kernel_available=True)
    assert not use_gradient_accumulation_fusion(False, True, kernel_available=True)
    assert not use_gradient_accumulation_fusion(True, False, kernel_available=True)


def test_batched_p2p_is_off_at_pp2_with_virtual_stages(monkeypatch):
    """At PP=2 the next and previous stage are one rank: batched p2p would pair an activation
    with a gradient (NCCL and gloo match messages to one peer in posting order)."""
    import torch

    from megatron_polar.model.config import build_transformer_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU
    batched, variable = {}, {}
    for pp, vpp in ((1, None), (2, None), (2, 2), (4, 2)):
        run = ModelRunConfig(pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vpp)
        cfg = build_transformer_config(get_preset("tiny"), run, use_te=False)
        batched[pp, vpp], variable[pp, vpp] = cfg.batch_p2p_comm, cfg.variable_seq_lengths
    assert batched == {(1, None): True, (2, None): True, (2, 2): False, (4, 2): True}
    # shapes are exchanged per micro-batch only without virtual stages; with them a step's
    # packs share one length (PackingSampler(uniform_length_per_step=True))
    assert variable == {(1, None): False, (2, None): True, (2, 2): False, (4, 2): False}
