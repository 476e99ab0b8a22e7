"""HF import/export: parity with transformers' Llama, exact round trips, any-layout export,
clear errors."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from megatron_polar.convert.hf_files import HFWeightReader
from megatron_polar.testing.hf_checkpoints import write_random_internlm2
from megatron_polar.data.tokenizer import PolarTokenizer
from megatron_polar.model.presets import get_preset
from megatron_polar.testing.tokenizers import make_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"
RECORDS = [
    {"prompt": "what is two plus two", "reference": "four, the cat said", "candidate": "four"},
    {"prompt": "tell a story about a river", "reference": "one river sat on a mat",
     "candidate": "the mountain model train data"},
    {"prompt": [{"role": "user", "content": "why"}], "reference": "because",
     "candidate": "", "id": "empty-candidate"},
    {"prompt": "apple", "reference": "", "candidate": "seven eight nine ten",
     "wrapper": "pretrain"},
    {"prompt": "how", "reference": "the same answer", "candidate": "the same answer"},
]


def run(args, nproc=1, timeout=300):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    proc = subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def hf_rm(tmp_path_factory):
    """A tiny random InternLM2ForRewardModel in fp32, with a tokenizer whose reward token is
    the config's, sharded into several safetensors files with an index."""
    root = tmp_path_factory.mktemp("hf")
    tok_path = make_sentencepiece(root)
    preset = get_preset("tiny").replace(reward_token_id=PolarTokenizer(tok_path).reward_token_id)
    hf = write_random_internlm2(root / "rm", preset, reward=True, max_shard_bytes=200_000)
    shutil.copy(tok_path, hf / "tokenizer.model")
    (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root, hf, preset


def convert_cli(argv: list[str]) -> int:
    """`tools/convert_hf.py` run in this process (argument parsing, messages, exit status),
    without a subprocess's seconds of imports."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_hf_cli",
                                                  ROOT / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def cli(*argv):
    """`convert_cli` with its exit status, stdout and stderr, like a finished subprocess."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = convert_cli([str(a) for a in argv])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def import_(hf, out, *extra):
    return cli("import", "--hf", hf, "--out", out, *extra)


def export(ckpt, out, *extra):
    return cli("export", "--ckpt", ckpt, "--out", out, *extra)


def all_tensors(directory) -> dict:
    reader = HFWeightReader(directory)
    return {n: reader.get(n) for n in reader.names()}


def llama_rewards(hf_dir: Path, preset, sequences) -> list[float]:
    """An independent implementation: transformers' LlamaModel with the InternLM2 weights
    un-fused (wqkv -> q/k/v per KV group, w1/w3 -> gate/up), v_head at the last token."""
    from transformers import LlamaConfig, LlamaModel

    w = all_tensors(hf_dir)
    cfg = LlamaConfig(
        vocab_size=preset.vocab_size, hidden_size=preset.hidden_size,
        intermediate_size=preset.ffn_hidden_size, num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_query_groups, rms_norm_eps=preset.norm_epsilon,
        max_position_embeddings=preset.max_position_embeddings,
        rope_parameters={"rope_type": "dynamic", "factor": preset.rope_scaling.factor,
                         "rope_theta": preset.rotary_base},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaModel(cfg).eval()
    hd, kv = preset.head_dim, preset.num_query_groups
    q_per_kv = preset.num_attention_heads // kv
    sd = {"embed_tokens.weight": w["model.tok_embeddings.weight"],
          "norm.weight": w["model.norm.weight"]}
    for i in range(preset.num_layers):
        p = f"model.layers.{i}."
        h = preset.hidden_size
        grouped = w[p + "attention.wqkv.weight"].view(kv, q_per_kv + 2, hd, h)
        sd.update({
            f"layers.{i}.self_attn.q_proj.weight": grouped[:, :q_per_kv].reshape(-1, h),
            f"layers.{i}.self_attn.k_proj.weight": grouped[:, -2].reshape(-1, h),
            f"layers.{i}.self_attn.v_proj.weight": grouped[:, -1].reshape(-1, h),
            f"layers.{i}.self_attn.o_proj.weight": w[p + "attention.wo.weight"],
            f"layers.{i}.mlp.gate_proj.weight": w[p + "feed_forward.w1.weight"],
            f"layers.{i}.mlp.up_proj.weight": w[p + "feed_forward.w3.weight"],
            f"layers.{i}.mlp.down_proj.weight": w[p + "feed_forward.w2.weight"],
            f"layers.{i}.input_layernorm.weight": w[p + "attention_norm.weight"],
            f"layers.{i}.post_attention_layernorm.weight": w[p + "ffn_norm.weight"],
        })
    model.load_state_dict(sd, strict=True)
    out = []
    with torch.no_grad():
        for ids in sequences:
            hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
            out.append(float(hidden @ w["v_head.weight"][0]))
    return out


def scored(stdout: str) -> list[float]:
    return [json.loads(line)["reward"] for line in stdout.splitlines() if line.startswith("{")]


def polar_sequences(root, hf):
    from megatron_polar.data.encoding import TripletEncoder

    enc = TripletEncoder(PolarTokenizer(hf))
    return [enc.encode_sequence(r["prompt"], r["reference"], r["candidate"],
                                r.get("wrapper", "sft")) for r in RECORDS]


def test_rewards_match_transformers_llama_at_tp1_and_tp2(hf_rm, tmp_path):
    root, hf, preset = hf_rm
    expected = llama_rewards(hf, preset, polar_sequences(root, hf))
    assert len(set(round(x, 6) for x in expected)) == len(expected)  # the check can tell apart
    tp1 = scored(ok(run(["-m", "megatron_polar.score", "--hf", str(hf),
                         "--input", str(root / "records.jsonl")])))
    ok(import_(hf, tmp_path / "ckpt", "--tensor-model-parallel-size", "2"))
    tp2 = scored(ok(run(["-m", "megatron_polar.score", "--checkpoint", str(tmp_path / "ckpt"),
                         "--input", str(root / "records.jsonl"),
                         "--tensor-model-parallel-size", "2"], nproc=2)))
    for got in (tp1, tp2):
        assert got == pytest.approx(expected, abs=1e-5, rel=0)


def test_round_trip_is_bit_exact_and_in_the_released_layout(hf_rm, tmp_path):
    root, hf, preset = hf_rm
    ok(import_(hf, tmp_path / "ckpt", "--part-size-mb", "0.1"))
    index = json.loads((tmp_path / "ckpt" / "polar_weights.json").read_text())
    assert len(index["parts"]) > 2  # written in parts, as a large model is
    ok(export(tmp_path / "ckpt", tmp_path / "out", "--dtype", "fp32", "--max-shard-size-mb", "0.2"))
    before, after = all_tensors(hf), all_tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert torch.equal(before[name], after[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["InternLM2ForRewardModel"]
    assert config["model_type"] == "internlm2"
    assert config["auto_map"]["AutoModel"] == "modeling_internlm2.InternLM2ForRewardModel"
    assert config["reward_token_id"] == preset.reward_token_id
    assert config["torch_dtype"] == "float32"
    assert after["v_head.weight"].shape == (1, preset.hidden_size)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    shipped = (tmp_path / "out" / "tokenizer.model").read_bytes()
    assert shipped == (hf / "tokenizer.model").read_bytes()


RESAVE = """
import sys
from megatron_polar.model.config import ModelRunConfig
from megatron_polar.model.presets import get_preset
from megatron_polar.runtime.checkpoints import load_model_weights, save_model_weights
from megatron_polar.runtime.parallel import initialize_parallel
from megatron_polar.runtime.chunks import build_model_chunks
if __name__ == "__main__":  # dist_checkpointing starts a multiprocessing manager
    src, dst, tp, pp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    run = ModelRunConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = initialize_parallel(run)
    chunks = build_model_chunks(get_preset(src), run, ctx)
    load_model_weights(chunks, src)
    save_model_weights(chunks, dst)
"""


def test_export_from_tp2pp2_checkpoint_equals_the_source(hf_rm, tmp_path):
    root, hf, preset = hf_rm
    ok(import_(hf, tmp_path / "ckpt"))
    script = tmp_path / "resave.py"
    script.write_text(RESAVE)
    # (An export of the TP=1 import itself equals the source: the round-trip test.)
    ok(run([str(script), str(tmp_path / "ckpt"), str(tmp_path / "tp2pp2"), "2", "2"], nproc=4))
    tok = str(tmp_path / "ckpt" / "tokenizer")
    ok(export(tmp_path / "tp2pp2", tmp_path / "hf_tp2pp2", "--dtype", "fp32",
              "--tokenizer", tok, "--model-preset", str(tmp_path / "ckpt")))
    four, source = all_tensors(tmp_path / "hf_tp2pp2"), all_tensors(hf)
    assert sorted(four) == sorted(source)
    for name in four:
        assert torch.equal(four[name], source[name]), name


def test_base_model_gets_a_zero_head_and_loses_its_lm_head(hf_rm, tmp_path):
    root, _, preset = hf_rm
    base = write_random_internlm2(tmp_path / "base", preset, reward=False, seed=3,
                                  dtype=torch.bfloat16)
    shutil.copy(root / "rm" / "tokenizer.model", base / "tokenizer.model")
    proc = import_(base, tmp_path / "ckpt")  # a base config has no reward_token_id
    assert proc.returncode == 2 and "--reward-token-id" in proc.stderr
    out = ok(import_(base, tmp_path / "ckpt", "--reward-token-id", str(preset.reward_token_id)))
    assert "reward head zero" in out and "output.weight" in out
    ok(export(tmp_path / "ckpt", tmp_path / "out"))  # default dtype: bf16, as released
    got, src = all_tensors(tmp_path / "out"), all_tensors(base)
    assert "output.weight" not in got
    assert got["v_head.weight"].shape == (1, preset.hidden_size)
    assert not got["v_head.weight"].any()
    for name in src:
        if name != "output.weight":
            assert torch.equal(got[name], src[name]), name


def _copy_hf(hf, dst):
    shutil.copytree(hf, dst)
    return dst


def test_bad_inputs_give_errors_naming_the_file_or_tensor(hf_rm, tmp_path):
    """The CLI's exit status and message (in this process; one case as a subprocess)."""
    root, hf, preset = hf_rm
    # A shard listed in the index is missing.
    broken = _copy_hf(hf, tmp_path / "missing")
    sorted(broken.glob("model-*.safetensors"))[1].unlink()
    proc = import_(broken, tmp_path / "o1")
    assert proc.returncode == 2 and "missing" in proc.stderr and ".safetensors" in proc.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o1.tmp").exists()
    # A tensor whose shape contradicts config.json.
    bad = _copy_hf(hf, tmp_path / "shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = import_(bad, tmp_path / "o2")
    assert proc.returncode == 2 and "feed_forward.w" in proc.stderr and "shape" in proc.stderr
    # An architecture we do not convert.
    other = _copy_hf(hf, tmp_path / "arch")
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    proc = import_(other, tmp_path / "o3")
    assert proc.returncode == 2 and "unsupported model" in proc.stderr
    assert "config.json" in proc.stderr
    # A tokenizer with more ids than the model's embedding.
    small = write_random_internlm2(tmp_path / "vocab", preset.replace(vocab_size=300,
                                                                       reward_token_id=4))
    proc = import_(small, tmp_path / "o4", "--tokenizer", str(hf / "tokenizer.model"))
    assert proc.returncode == 2 and "320 tokens" in proc.stderr and "vocab_size 300" in proc.stderr
    # A preset named on the command line that the checkpoint does not match.
    proc = import_(hf, tmp_path / "o5", "--model-preset", "tiny-2l")
    assert proc.returncode == 2 and "num_layers" in proc.stderr
    # A layout the model cannot be split into.
    proc = import_(hf, tmp_path / "o6", "--tensor-model-parallel-size", "3")
    assert proc.returncode == 2 and "not divisible by TP=3" in proc.stderr
    # An export with no tokenizer to ship.
    ok(import_(hf, tmp_path / "ck"))
    shutil.rmtree(tmp_path / "ck" / "tokenizer")
    proc = export(tmp_path / "ck", tmp_path / "o7")
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr
    # The same through a subprocess: the script's exit status and stderr.
    proc = run(["tools/convert_hf.py", "export", "--ckpt", str(tmp_path / "ck"), "--out",
                str(tmp_path / "o8")])
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr


def test_trainer_starts_from_an_imported_checkpoint_with_load(hf_rm, tmp_path):
    """`--load` of an import starts at iteration 0 from its weights, preset taken from it."""
    from megatron_polar.data.build import BuildConfig, build_triplets
    from tests.test_build_triplets import good_records, write_jsonl

    root, hf, preset = hf_rm
    ok(import_(hf, tmp_path / "ckpt"))
    src = write_jsonl(tmp_path / "pairs.jsonl", good_records(40, 5))
    tok = str(hf / "tokenizer.model")
    build_triplets(BuildConfig([src], str(tmp_path / "pairs"), tok), progress=False)
    args = ["-m", "megatron_polar.train", "--data-path", str(tmp_path / "pairs"),
            "--tokenizer", tok, "--micro-batch-tokens", "768", "--global-batch-size", "4",
            "--lr", "1e-3", "--train-iters", "1", "--load", str(tmp_path / "ckpt"),
            "--save", str(tmp_path / "run"), "--log-interval", "1"]
    out = ok(run(args))
    assert "initial weights from" in out
    saved = tmp_path / "run" / "iter_0000001"
    assert json.loads((saved / "model.json").read_text())["num_layers"] == preset.num_layers
    assert (saved / "tokenizer" / "tokenizer.model").is_file()
    # ... and the trained checkpoint exports with what it carries (preset, tokenizer).
    ok(export(tmp_path / "run", tmp_path / "out"))
    proc = run(args[:-4] + ["--model-preset", "tiny-2l", "--load", str(tmp_path / "ckpt")])
    assert proc.returncode != 0 and "does not match" in proc.stderr


def test_score_encoding_is_the_training_encoding(hf_rm):
    """A scored sequence is s+ of a triplet whose s- is shorter (the budget follows s+)."""
    from megatron_polar.data.encoding import EncodingConfig, TripletEncoder

    _, hf, _ = hf_rm
    enc = TripletEncoder(PolarTokenizer(hf), EncodingConfig(max_length=40,
                                                            max_response_length=12))
    long_prompt = "the cat sat on a mat " * 20
    for p, ref, pos, neg in (("how", "one two", "three four five", "six"),
                             (long_prompt, "why " * 30, "apple river " * 3, "a"),
                             ([{"role": "user", "content": long_prompt}], "", "seven eight nine",
                              "a")):
        for wrapper in ("sft", "pretrain"):
            assert enc.encode_sequence(p, ref, pos, wrapper) == enc.encode(p, ref, pos, neg,
                                                                            wrapper)[0]
