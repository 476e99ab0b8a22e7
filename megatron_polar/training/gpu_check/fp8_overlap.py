"""Items that run through Transformer Engine alone: FP8 train steps vs bf16 (`fp8_step`), and
TP communication overlap through TE userbuffers vs without (`tp_comm_overlap`)."""

from __future__ import annotations

import torch

from megatron_polar.training.gpu_check import models
from megatron_polar.training.gpu_check.common import Findings, SkipCheck
from megatron_polar.training.gpu_check.env import CheckEnv, free_memory
from megatron_polar.training.gpu_check.models import copy_weights


# -- d. FP8 ------------------------------------------------------------------------------------

def check_fp8_step(env: CheckEnv, f: Findings) -> None:
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.schedules import score_packed
    from megatron_polar.training.optimizer import build_optimizer
    from megatron_polar.training.step import train_step

    if not env.on_gpu:
        raise SkipCheck("needs a CUDA GPU with Transformer Engine")
    if not env.te:
        raise SkipCheck("Transformer Engine does not import here (FP8 runs through it)")
    if env.capability is None or env.capability < (9, 0):
        raise SkipCheck(f"FP8 needs compute capability >= 9.0 (Hopper); this GPU is "
                        f"{env.capability}")
    preset = env.check_preset
    fp8 = (env.args.fp8_format, env.args.fp8_recipe)
    # The FP8 context is megatron's own: TransformerBlock.forward enters get_fp8_context(config)
    # when config.fp8 is set (transformer/transformer_block.py:711-721), which is TE's
    # fp8_autocast with the recipe of config.fp8_recipe (fp8_utils.py:536-650).
    reference = models.build(env, preset, bf16=True, use_te=True)
    quantized = models.build(env, preset, bf16=True, use_te=True, fp8=fp8)
    copy_weights(reference, quantized)
    packs = [env.pack(env.pairs(4)), env.pack(env.pairs(5))]
    # lr 0: the weights stay those copied, so every step compares the same model on the same
    # batch; the steps before the last fill delayed scaling's amax history (its first step
    # quantizes with scale 1, before any amax is known).
    optimizer_config = OptimizerConfig(optimizer="adam", lr=0.0, bf16=True,
                                       params_dtype=torch.bfloat16, clip_grad=1.0)
    results = {}
    for name, chunks in (("bf16", reference), ("fp8", quantized)):
        optimizer = build_optimizer(chunks, optimizer_config, env.ctx)
        steps = [train_step(chunks, optimizer, packs, env.ctx)
                 for _ in range(env.args.fp8_steps)]
        rewards = score_packed(chunks, packs, env.ctx)
        results[name] = (steps, rewards)
    (b_steps, b_rewards), (q_steps, q_rewards) = results["bf16"], results["fp8"]
    f.figures.update(format=fp8[0], recipe=fp8[1], steps=env.args.fp8_steps,
                     loss_bf16=[s.metrics.loss for s in b_steps],
                     loss_fp8=[s.metrics.loss for s in q_steps],
                     grad_norm_bf16=[s.grad_norm for s in b_steps],
                     grad_norm_fp8=[s.grad_norm for s in q_steps])
    loss_b, loss_q = b_steps[-1].metrics.loss, q_steps[-1].metrics.loss
    if env.injected("fp8_step"):
        loss_q *= 2.0
    loss_err = abs(loss_q - loss_b) / max(abs(loss_b), 1e-30)
    tol = env.tol("fp8_loss")
    f.figures["loss_rel_err"] = {"rel_err": loss_err, "tol": tol}
    f.headline_parts.append(f"loss {loss_b:.4f} vs {loss_q:.4f} ({loss_err:.1e})")
    if not loss_err <= tol:
        f.fail(f"last-step loss: FP8 {loss_q:.5g} vs bf16 {loss_b:.5g}, relative "
               f"{loss_err:.3g} > {tol:.3g}")
    f.compare("rewards_after_steps", q_rewards, b_rewards, env.tol("fp8_reward"), headline=True)
    for step in q_steps:
        if not step.update_successful:
            f.fail("an FP8 step was skipped (non-finite loss or gradient norm)")
            break


# -- e2. TP communication overlap (TE userbuffers) ---------------------------------------------

def _overlap_tokens(env: CheckEnv) -> int:
    """The token count of every pack of the item (the userbuffers' shape); SkipCheck when this
    run cannot overlap TP communication."""
    tp = env.ctx.tp_size
    missing = [what for what, ok in (
        ("a CUDA GPU", env.on_gpu), ("Transformer Engine", env.te),
        (f"TP >= 2 (this run: TP={tp}, world size {env.world}; start it with "
         "--tensor-model-parallel-size 2)", tp >= 2)) if not ok]
    if missing:
        raise SkipCheck("needs TE, CUDA and torchrun with >= 2 GPUs, e.g. `torchrun "
                        "--nproc-per-node 8 tools/gpu_check.py --tensor-model-parallel-size 2 "
                        f"--checks tp_comm_overlap`; missing: {', '.join(missing)}")
    # One activation shape for every pack, as the trainer pads every pack to
    # --micro-batch-tokens under --tp-comm-overlap: the userbuffers are sized for it and TE's
    # overlapped GEMMs take exactly that many tokens. Sequence parallelism splits them over TP.
    tokens = env.pack_len
    if tokens % tp:
        raise SkipCheck(f"the pack of {tokens} tokens does not split over TP={tp} (sequence "
                        "parallelism)")
    return tokens


def check_tp_comm_overlap(env: CheckEnv, f: Findings) -> None:
    from megatron_polar.training.step import destroy_userbuffers, initialize_userbuffers

    ctx, tp = env.ctx, env.ctx.tp_size
    tokens = _overlap_tokens(env)
    preset = env.check_preset
    # Megatron overlaps the sequence-parallel all-gather / reduce-scatter with the GEMMs, so
    # tp_comm_overlap needs sequence_parallel (ModelRunConfig refuses it without, as
    # Megatron-LM's arguments.py does); TP is this run's (the parallel state the tool set up).
    layout = dict(tensor_model_parallel_size=tp, sequence_parallel=True)
    initialize_userbuffers(tokens, preset.hidden_size, tp, fp8=False, bf16=True)
    try:
        reference = models.build(env, preset, bf16=True, use_te=True, tp_comm_overlap=False,
                                 **layout)
        overlapped = models.build(env, preset, bf16=True, use_te=True, tp_comm_overlap=True,
                                  **layout)
        f.figures.update(tensor_parallel=tp, data_parallel=ctx.dp_size, tokens=tokens,
                         tensors_copied=copy_weights(reference, overlapped))
        _compare_overlapped_step(env, f, reference, overlapped)
        del reference, overlapped
    finally:
        free_memory()
        destroy_userbuffers()


def _compare_overlapped_step(env: CheckEnv, f: Findings, reference, overlapped) -> None:
    """One train step and the rewards of the same pack, without overlap and with."""
    from megatron.core.optimizer import OptimizerConfig

    from megatron_polar.runtime.schedules import score_packed
    from megatron_polar.training.optimizer import build_optimizer
    from megatron_polar.training.step import train_step

    ctx, tp = env.ctx, env.ctx.tp_size
    # Every TP rank of a DP replica takes the same pack; lr 0 keeps the copied weights.
    pack = env.pack(env.pairs(8 + ctx.dp_rank))
    optimizer_config = OptimizerConfig(optimizer="adam", lr=0.0, bf16=True,
                                       params_dtype=torch.bfloat16, clip_grad=1.0)
    results = {}
    for name, chunks in (("no_overlap", reference), ("overlap", overlapped)):
        optimizer = build_optimizer(chunks, optimizer_config, ctx)
        step = train_step(chunks, optimizer, [pack], ctx)
        results[name] = (step, score_packed(chunks, [pack], ctx))
        del optimizer
    (ref_step, ref_rewards), (ovl_step, ovl_rewards) = results["no_overlap"], \
        results["overlap"]
    loss_ref, loss_ovl = ref_step.metrics.loss, ovl_step.metrics.loss
    if env.injected("tp_comm_overlap"):
        loss_ovl *= 2.0
    for what, got, ref, tol in (("loss", loss_ovl, loss_ref, env.tol("bf16")),
                                ("grad_norm", ovl_step.grad_norm, ref_step.grad_norm,
                                 env.tol("bf16_grad"))):
        err = abs(got - ref) / max(abs(ref), 1e-30)
        f.figures[what] = {"no_overlap": ref, "overlap": got, "rel_err": err, "tol": tol}
        if not err <= tol:
            f.fail(f"{what}: with overlap {got:.5g} vs without {ref:.5g}, relative "
                   f"{err:.3g} > {tol:.3g}")
    f.headline_parts.append(f"TP={tp}, loss {loss_ref:.4f} vs {loss_ovl:.4f}")
    if ref_rewards is not None:  # the last pipeline stage (PP is 1 here)
        f.compare("rewards", ovl_rewards, ref_rewards, env.tol("bf16"), headline=True)
    if not (ref_step.update_successful and ovl_step.update_successful):
        f.fail("a step was skipped (non-finite loss or gradient norm)")
