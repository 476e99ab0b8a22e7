"""Model helpers of the items: `build` (the trainer's own builder), weights by checkpoint key
(`keyed_tensors`, `copy_weights`), and the gradients of the pair loss and their comparison.

The items call `models.build` through this module, so that a test can replace it here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_polar.training.gpu_check.common import PER_PARAM_FACTOR, Findings
from megatron_polar.training.gpu_check.env import CheckEnv

def build(env: CheckEnv, preset, *, bf16: bool, use_te: bool, fp8: Optional[tuple] = None,
          ddp=None, **run_fields) -> list:
    """Model chunks of `preset` through the trainer's own builder (`build_model_chunks`);
    `run_fields` are further ModelRunConfig fields (the parallel layout of tp_comm_overlap)."""
    from megatron_polar.model.config import FP8Config, ModelRunConfig
    from megatron_polar.runtime.chunks import build_model_chunks

    fp8_config = FP8Config(format=fp8[0], recipe=fp8[1]) if fp8 else FP8Config()
    run = ModelRunConfig(bf16=bf16, use_transformer_engine=use_te, fp8=fp8_config,
                         seed=env.args.seed, **run_fields)
    return build_model_chunks(preset, run, env.ctx, ddp)


def keyed_tensors(chunks) -> dict:
    """{checkpoint key: the live parameter} from megatron's sharded state dict.

    The keys are the same for the local and the TE spec: the local spec maps its separate norms
    onto TE's fused names (megatron/core/models/gpt/gpt_layer_specs.py 0.16.1, lines 417-420:
    "input_layernorm." -> "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm." ->
    "mlp.linear_fc1.layer_norm_"), which is what makes checkpoints portable between specs.
    The tensors are the parameters themselves (state_dict(keep_vars=True)); SwiGLU's fc1 comes
    as a ShardedTensorFactory whose `data` is the parameter (transformer/mlp.py:261-266).
    Module extra state (ShardedObjects: TE's FP8 metadata) is left out.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_polar.runtime.checkpoints import model_sharded_state_dict

    out = {}
    for leaf in nested_values(model_sharded_state_dict(chunks)):
        if isinstance(leaf, (ShardedTensor, ShardedTensorFactory)) \
                and isinstance(leaf.data, torch.Tensor) and leaf.data.numel() > 0:
            out[leaf.key] = leaf.data
    return out


def copy_weights(src_chunks, dst_chunks) -> int:
    """Copy every weight of `src` into `dst` by checkpoint key; both must hold the same keys and
    shapes. Returns the number of tensors copied."""
    src, dst = keyed_tensors(src_chunks), keyed_tensors(dst_chunks)
    missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
    if missing or extra:
        raise RuntimeError(f"weights do not map between the models: the target has "
                           f"{missing[:3]} the source lacks, the source has {extra[:3]} "
                           "the target lacks")
    with torch.no_grad():
        for key, tensor in dst.items():
            if tensor.shape != src[key].shape:
                raise RuntimeError(f"{key}: shape {tuple(src[key].shape)} does not fit "
                                   f"{tuple(tensor.shape)}")
            tensor.copy_(src[key])
    return len(dst)


def loss_gradients(chunks, batch) -> dict:
    """Weight gradients (fp32, by checkpoint key) of the summed pair loss -log sigmoid(r+ - r-)
    over `batch` (a PackedMicroBatch or a PaddedBatch of s+_0, s-_0, s+_1, ...), one forward
    and backward outside megatron's schedules. Gradients land in megatron DDP's `main_grad`
    buffers (distributed/distributed_data_parallel.py:436-441, or TE's fused wgrad
    accumulation with gradient_accumulation_fusion); without overlap_grad_reduce nothing is
    communicated, so every rank keeps its own."""
    from megatron_polar.data.packing import PackedMicroBatch
    from megatron_polar.model.reward_model import rewards_at
    from megatron_polar.runtime.device import compute_device

    chunk = chunks[0]
    device = compute_device()
    chunk.zero_grad_buffer()
    chunk.train()
    if hasattr(chunk, "set_is_first_microbatch"):  # as megatron's schedules do (schedules.py:404)
        chunk.set_is_first_microbatch()
    if isinstance(batch, PackedMicroBatch):
        tokens, position_ids, params = batch.model_inputs(device)
        scores = chunk(tokens, position_ids, None, packed_seq_params=params)
    else:
        scores = chunk(batch.tokens.to(device), batch.position_ids.to(device), None)
    rewards = rewards_at(scores, batch.reward_positions.to(device))
    loss = -F.logsigmoid(rewards[0::2] - rewards[1::2]).sum()
    loss.backward()
    return collect_gradients(chunks)


def collect_gradients(chunks) -> dict:
    """Every weight gradient (fp32 copies, by checkpoint key) from megatron DDP's `main_grad`
    buffers (or `.grad`), then the buffers zeroed."""
    grads = {}
    for key, param in keyed_tensors(chunks).items():
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            grads[key] = grad.detach().float().clone()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    return grads


def gradient_errors(got: dict, ref: dict) -> tuple[float, dict]:
    """(whole-model relative L2 error, {key: the tensor's relative error}) of `got` vs `ref`."""
    num = den = 0.0
    per = {}
    for key, r in ref.items():
        d = (got[key].double() - r.double().to(got[key].device)).norm().item()
        n = r.double().norm().item()
        num, den = num + d * d, den + n * n
        per[key] = d / max(n, 1e-30)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30), per


def compare_gradients(findings: Findings, name: str, got: dict, ref: dict, tol: float) -> None:
    """Whole-model relative error within `tol`, and every tensor within PER_PARAM_FACTOR x tol."""
    if set(got) != set(ref):
        findings.fail(f"{name}: gradients of different tensors "
                      f"({sorted(set(got) ^ set(ref))[:3]})")
        return
    total, per_param = gradient_errors(got, ref)
    worst = sorted(per_param.items(), key=lambda kv: -kv[1])[:3]
    findings.figures[name] = {"rel_err": total, "tol": tol, "tensors": len(ref),
                              "worst_tensors": {k: v for k, v in worst},
                              "per_tensor_tol": PER_PARAM_FACTOR * tol}
    findings.headline_parts.append(f"{name} {total:.1e}")
    if not total <= tol:
        findings.fail(f"{name}: relative error {total:.3g} > tolerance {tol:.3g}")
    bad = [(k, v) for k, v in per_param.items() if not v <= PER_PARAM_FACTOR * tol]
    if bad:
        findings.fail(f"{name}: {len(bad)} tensor(s) beyond {PER_PARAM_FACTOR * tol:.3g}, "
                      f"e.g. {bad[0][0]} at {bad[0][1]:.3g}")


def sequences(pairs) -> list:
    return [seq for pair in pairs for seq in pair]
