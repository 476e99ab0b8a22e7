"""The configurations labs run: `examples/pretrain_1_8b.yaml` and `pretrain_7b.yaml`, every flag
as shipped, on CPU (gloo) with a tiny model.

Only what cannot run here is replaced (`CPU_OVERRIDES`): the preset (tiny), the layer spec
(local: no Transformer Engine), the batch, budget and schedule sizes (a tiny dataset), the
number of recomputed layers (the tiny model has 4) and the save/eval cadence. Everything else
(distributed optimizer, overlapped grad reduce-scatter and param all-gather, sequence
parallelism, full/block recompute, `--train-tokens`, async saves, bf16, Adam settings) is the
shipped YAML's. Each run is compared with the same YAML at TP=1 DP=1 without any of the
parallel or memory features ("reference"), then resumed from its iteration-3 checkpoint.
"""

from pathlib import Path

import pytest
import torch
import yaml

from megatron_polar.training.arguments import RESOLVED_CONFIG
from tests.test_trainer import losses, records, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6  # iterations the token budget buys

CPU_OVERRIDES = {
    "model-preset": "tiny", "transformer-impl": "local", "micro-batch-tokens": 768,
    "global-batch-size": 8, "lr": 2.0e-3, "min-lr": 2.0e-4, "recompute-num-layers": 1,
    "valid-fraction": 0.05, "eval-iters": 1, "save-interval": 3, "log-interval": 1,
}
# The reference: the same YAML without parallelism, distributed optimizer, overlap, recompute.
SINGLE = {"tensor-model-parallel-size": 1, "sequence-parallel": False,
          "use-distributed-optimizer": False, "overlap-grad-reduce": False,
          "overlap-param-gather": False, "recompute-granularity": None,
          "recompute-method": None, "recompute-num-layers": None, "async-save": False}


def config(tmp: Path, name: str, shipped: str, bf16: bool, **changes) -> Path:
    values = yaml.safe_load((ROOT / "examples" / shipped).read_text())
    values.update(CPU_OVERRIDES)
    values.update({"bf16": bf16, **{k.replace("_", "-"): v for k, v in changes.items()}})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Runs made once and shared by the tests below, by name."""
    root, tok, init = data
    tmp = tmp_path_factory.mktemp("configs")
    from megatron_polar.data.dataset import BlendSpec, TripletStream
    from megatron_polar.data.sampler import PackingSampler

    # The token budget that the STEPS-th step reaches (the trainer's own stream and planner).
    stream = TripletStream(BlendSpec.parse([str(root / "pairs")]), "train", 0.05, 7, None)
    sampler = PackingSampler(stream, 8, token_budget=768)
    tokens = sum(sampler.plan_step().tokens for _ in range(STEPS)) - 1
    made = {}

    def run(name, shipped, bf16, nproc, *extra, resume_from=None, expect_rc=0, **changes):
        key = name
        if key in made:
            return made[key]
        cfg = config(tmp, name, shipped, bf16, train_tokens=tokens, **changes)
        ckpt = root / name / "ckpt"
        args = ["--config", str(cfg), "--save", str(ckpt), *extra]
        if resume_from:
            args += ["--load", str(root / resume_from / "ckpt"), "--ckpt-step", "3"]
        else:
            args += ["--pretrained-checkpoint", str(init)]
        out = train(root, name, *args, data=data, nproc=nproc, expect_rc=expect_rc,
                    timeout=600)
        made[key] = out
        return out

    run.root, run.tokens = root, tokens
    return run


def assert_close(a: dict, b: dict, iterations, tol, what):
    for it in iterations:
        assert abs(a[it] - b[it]) <= tol, (what, it, a[it], b[it])


def assert_saved_weights_are_the_steps(root, name, reference):
    """The iteration-3 checkpoint holds the weights after step 3. With an overlapped param
    all-gather megatron leaves them sharded until the next forward, and a save that does not
    force the gather writes the step before's values for every element this rank does not own
    (the whole other half of each bucket at DP=2): a whole Adam step (~lr = 2e-3) off the
    reference. Another layout only perturbs a few elements: Adam normalises each update, so an
    element whose gradient is ~0 can move by up to lr on rounding noise alone."""
    from megatron.core.dist_checkpointing.serialization import load_plain_tensors

    mine = load_plain_tensors(str(root / name / "ckpt" / "iter_0000003"))
    ref = load_plain_tensors(str(root / reference / "ckpt" / "iter_0000003"))
    keys = [k for k in ref if isinstance(ref[k], torch.Tensor) and k.startswith(
        ("embedding.", "decoder.", "output_layer."))]
    assert len(keys) > 10
    off = sum(int(((mine[k].float() - ref[k].float()).abs() > 1e-5).sum()) for k in keys)
    total = sum(ref[k].numel() for k in keys)
    assert off / total < 0.01, (name, off, total)


def test_1_8b_config_fp32_matches_one_process_saves_the_step_and_resumes(runs, ctx1):
    root = runs.root
    runs("ref32", "pretrain_1_8b.yaml", False, 1, **SINGLE)
    runs("c18_32", "pretrain_1_8b.yaml", False, 2)
    ref, dp2 = losses(root, "ref32"), losses(root, "c18_32")
    # --train-tokens stops at the first step that reaches it, and the runs agree on where.
    logged = records(root, "c18_32")
    assert logged[-1]["consumed_tokens"] >= runs.tokens > logged[-2]["consumed_tokens"]
    assert sorted(ref) == sorted(dp2) == list(range(1, STEPS + 1))
    assert_close(ref, dp2, range(1, 6), 1e-4, "DP2 vs one process")
    assert len(set(dp2.values())) > 1
    # Async saves as shipped, the last 3 kept: 3 and the final one.
    saved = sorted(p.name for p in (root / "c18_32" / "ckpt").iterdir())
    assert saved == ["iter_0000003", f"iter_{STEPS:07d}", "latest_checkpointed_iteration.txt",
                     RESOLVED_CONFIG]  # and the run's flags as resolved
    assert_saved_weights_are_the_steps(root, "c18_32", "ref32")

    # DP2 -> DP1 (the default dp_reshardable optimizer state reshards over DP).
    runs("c18_32_dp1", "pretrain_1_8b.yaml", False, 1, resume_from="c18_32")
    dp1 = losses(root, "c18_32_dp1")
    assert sorted(dp1) == list(range(4, STEPS + 1))
    assert_close(dp1, dp2, dp1, 1e-4, "DP2 -> DP1 resume")
    # The same flags with the layers split over PP=2 in 2 virtual stages each (interleaved
    # schedule: a multiple of PP packs per rank and step, one length per step).
    # Saved fully reshardable, it resumes in one process (PP=2 x VPP=2 -> PP=1).
    runs("c18_32_vpp", "pretrain_1_8b.yaml", False, 2, "--dist-ckpt-optim-fully-reshardable",
         pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1)
    vpp = losses(root, "c18_32_vpp")
    assert sorted(vpp) == list(range(1, STEPS + 1))
    assert_close(ref, vpp, range(1, 6), 1e-4, "PP2 x VPP2 vs one process")
    runs("c18_32_vpp_pp1", "pretrain_1_8b.yaml", False, 1, resume_from="c18_32_vpp")
    pp1 = losses(root, "c18_32_vpp_pp1")
    assert sorted(pp1) == list(range(4, STEPS + 1))
    assert_close(pp1, vpp, pp1, 1e-4, "PP2 x VPP2 -> PP1 resume")
    # TP change with dp_reshardable optimizer state: refused, one line naming the fix.
    out = runs("c18_32_tp2", "pretrain_1_8b.yaml", False, 2, resume_from="c18_32",
               expect_rc=1, tensor_model_parallel_size=2)
    assert "loads only at the same TP, PP, VPP and bucketing" in out
    assert "--no-load-optim" in out
    assert "megatron_polar/training" not in out  # one error line, no traceback of ours


def test_7b_config_fp32_tp2_matches_one_process_and_resumes_at_tp1(runs, ctx1):
    root = runs.root
    runs("ref32", "pretrain_1_8b.yaml", False, 1, **SINGLE)
    # TP=2 with sequence parallelism (DP over TP groups is the 1.8B test's; two cores here),
    # state saved fully reshardable to change layout.
    runs("c7_32", "pretrain_7b.yaml", False, 2, "--dist-ckpt-optim-fully-reshardable")
    ref, tp2 = losses(root, "ref32"), losses(root, "c7_32")
    assert sorted(tp2) == list(range(1, STEPS + 1))
    assert_close(ref, tp2, range(1, 6), 1e-4, "TP2 vs one process")
    assert_saved_weights_are_the_steps(root, "c7_32", "ref32")
    runs("c7_32_tp1", "pretrain_7b.yaml", False, 1, resume_from="c7_32",
         tensor_model_parallel_size=1, sequence_parallel=False)
    tp1 = losses(root, "c7_32_tp1")
    assert sorted(tp1) == list(range(4, STEPS + 1))
    assert_close(tp1, tp2, tp1, 1e-4, "TP2 -> TP1 resume")
