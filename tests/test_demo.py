"""The demo's own parts: corpus, tokenizer, policy training, ranked sets, stage reuse.
(`make demo` runs the whole pipeline; these check its pieces quickly.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_polar.demo.pipeline import DemoConfig, DemoPipeline, Stage, run_stage
from megatron_polar.demo.policies import PolicyRun, PolicyShape, train_policy_run
from megatron_polar.demo.tokenizer import train_tokenizer

# The corpus's digest with torch==2.13.0 and megatron-core==0.16.1 (docs/demo.md).
CORPUS_SHA256 = "8bea8b5d614535d2"

TEXTS = ["Return the number of items in the container.\n\nRaises ValueError if empty.",
         "def add(a, b):\n    return a + b\n", "Open a file and return a stream object."] * 40


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, d, vocab_size=400)
    return d


def test_corpus_comes_from_the_pinned_packages_sources():
    from importlib import metadata

    from megatron_polar.demo.corpus import KINDS, SOURCES, corpus_digest, package_documents

    docs = package_documents()
    assert all(len(docs[kind]) > 500 for kind in KINDS)
    assert all(200 <= len(d) <= 4000 for kind in KINDS for d in docs[kind])
    python_def = re.compile(r"^\s*(async\s+)?def \w+\(", re.MULTILINE)
    assert all(python_def.search(d) for d in docs["code"])
    assert not any(python_def.search(d) for d in docs["cpp"])
    assert sum(("::" in d or "#include" in d) for d in docs["cpp"]) > 0.5 * len(docs["cpp"])
    assert not any("Copyright" in d or "License" in d for d in docs["cpp"])
    # Nothing of the standard library (its text changes with the Python patch release).
    assert set(docs["versions"]) == {s.distribution for s in SOURCES}
    pinned = all(metadata.version(s.distribution).split("+")[0] == s.version for s in SOURCES)
    if pinned:  # the same text on every machine and Python 3.11.x (docs/demo.md)
        assert corpus_digest(docs) == CORPUS_SHA256


def test_cpp_documents_are_whole_paragraphs_without_license_text():
    from megatron_polar.demo.corpus import _cpp_documents

    header = ("// Copyright (c) Somebody. BSD license.\n\n#pragma once\n#include <a.h>\n\n"
              + "\n\n".join(f"int f{i}(int x) {{\n  return x + {i};\n}}" for i in range(40)))
    blocks = _cpp_documents(header, min_chars=100, max_chars=300)
    assert blocks and all(100 <= len(b) <= 300 for b in blocks)
    assert not any("Copyright" in b for b in blocks)
    text = "\n\n".join(blocks)
    assert text.startswith("#pragma once") and all(f"int f{i}(" in text for i in range(38))


def test_tokenizer_serves_policies_and_reward_model(tokenizer_dir):
    from transformers import AutoTokenizer

    from megatron_polar.data.tokenizer import PolarTokenizer

    polar = PolarTokenizer(tokenizer_dir)
    assert (polar.bos_id, polar.separator_id, polar.reward_token_id) == (1, 3, 4)
    text = "  Odd   spacing,\ttabs\nand ünïcode 😀 survive."
    assert polar.decode(polar.encode(text)) == text
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert hf(text, add_special_tokens=False)["input_ids"] == polar.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)


def test_policy_run_saves_loadable_checkpoints(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run = PolicyRun("p", {"prose": 0.5, "code": 0.5}, (2, 4), batch_size=4, seq_len=16,
                    shape=PolicyShape(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                      ffn_hidden_size=32))
    steps = []
    saved = train_policy_run(run, {"prose": TEXTS[::3], "code": TEXTS[1::3]}, tokenizer_dir,
                             tmp_path, steps.append)
    assert [p.name for p in saved] == ["p-2", "p-4"] and len(steps) == 4
    assert not list(tmp_path.glob(".*"))  # no temporary directories left
    a, b = (AutoModelForCausalLM.from_pretrained(str(p)) for p in saved)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert (saved[0] / "tokenizer.json").is_file()


def test_ranked_sets_order_checkpoints_and_keep_held_out_apart(tmp_path):
    cfg = DemoConfig(workdir=str(tmp_path), eval_every=2,
                     runs=(PolicyRun("r", {"prose": 1.0}, (10, 20, 30, 40)),),
                     held_out=("r-20",))
    pipe = DemoPipeline(cfg)
    assert cfg.training_policies() == ["r-10", "r-30", "r-40"]
    trajectories = [{"prompt_id": f"c{i:06d}", "prompt": f"p{i}", "policy": f"r-{s}",
                     "sample_index": 0, "trajectory": f"answer of r-{s} to {i}"}
                    for i in range(4) for s in (10, 20, 30, 40)]
    train = pipe.ranked(trajectories, eval_prompts=False, policies=set(cfg.training_policies()))
    assert [r["id"] for r in train] == ["c000001/r", "c000003/r"]  # odd ids: training prompts
    for r in train:
        assert r["policies"] == ["r-40", "r-30", "r-10"]  # later checkpoint ranks higher
        assert r["responses"][0] == f"answer of r-40 to {r['prompt'][1:]}"
    evaluation = pipe.ranked(trajectories, eval_prompts=True, policies=None)
    assert [r["id"] for r in evaluation] == ["c000000/r", "c000002/r"]
    for r in evaluation:
        steps = [int(p.split("-")[1]) for p in r["policies"]]
        assert steps == sorted(steps, reverse=True) and len(set(steps)) == 3


def test_a_changed_stage_changes_the_keys_of_the_stages_after_it(tmp_path):
    def keys(**changes):
        pipe = DemoPipeline(DemoConfig(workdir=str(tmp_path), **changes))
        return [pipe.stage("a", "vocab_size").key, pipe.stage("b", "sft_lr").key,
                pipe.stage("c", "seed").key]

    base = keys()
    assert keys() == base
    changed = keys(sft_lr=1.0)  # the second stage's setting
    assert changed[0] == base[0] and changed[1] != base[1] and changed[2] != base[2]


def test_finished_stages_are_reused_and_changed_ones_redone(tmp_path):
    calls = []

    def work(stage, bar):
        calls.append(stage.key)
        (stage.dir / "out.txt").write_text(stage.key)
        return {"value": len(calls)}

    first = run_stage(Stage(tmp_path, "s", "k1"), work, 1, "step")
    again = run_stage(Stage(tmp_path, "s", "k1"), work, 1, "step")
    assert calls == ["k1"] and again == first
    changed = run_stage(Stage(tmp_path, "s", "k2"), work, 1, "step")
    assert calls == ["k1", "k2"] and changed["value"] == 2
    assert json.loads((tmp_path / "s" / "stage.json").read_text())["key"] == "k2"
    # A stage that failed part-way leaves no stamp: it is redone.
    with pytest.raises(RuntimeError):
        run_stage(Stage(tmp_path, "t", "k"), lambda s, b: (_ for _ in ()).throw(
            RuntimeError("boom")), 1, "step")
    assert not (tmp_path / "t" / "stage.json").exists()


def test_base_model_becomes_an_internlm2_checkpoint_the_importer_reads(tokenizer_dir, tmp_path):
    from safetensors.torch import load_file

    from megatron_polar.demo.base_model import llama_to_internlm2
    from megatron_polar.model.presets import get_preset

    shape = PolicyShape(hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                        ffn_hidden_size=176, max_position_embeddings=64)
    (llama,) = train_policy_run(PolicyRun("b", {"prose": 1.0}, (1,), batch_size=2, seq_len=16,
                                          shape=shape), {"prose": TEXTS}, tokenizer_dir, tmp_path)
    vocab = json.loads((llama / "config.json").read_text())["vocab_size"]  # the tokenizer's
    preset = get_preset("tiny").replace(name="demo", vocab_size=vocab, reward_token_id=4,
                                        max_position_embeddings=64)
    hf = llama_to_internlm2(llama, tmp_path / "internlm2", preset)
    src = load_file(str(llama / "model.safetensors"))
    dst = load_file(str(hf / "model.safetensors"))
    # Un-fuse wqkv per KV group (2 query heads, then k, then v, 16 rows each).
    grouped = dst["model.layers.2.attention.wqkv.weight"].view(2, 4, 16, 64)
    for rows, name in ((grouped[:, :2], "q_proj"), (grouped[:, 2], "k_proj"),
                       (grouped[:, 3], "v_proj")):
        assert torch.equal(rows.reshape(-1, 64), src[f"model.layers.2.self_attn.{name}.weight"])
    assert torch.equal(dst["model.layers.0.feed_forward.w3.weight"],
                       src["model.layers.0.mlp.up_proj.weight"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "tools/convert_hf.py", "import", "--hf", str(hf),
                           "--out", str(tmp_path / "ckpt"), "--reward-token-id", "4",
                           "--tokenizer", str(tokenizer_dir)], capture_output=True, text=True,
                          env=env, cwd=str(Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    imported = get_preset(str(tmp_path / "ckpt"))
    assert not imported.differences(preset, ("num_layers", "hidden_size", "num_attention_heads",
                                              "num_query_groups", "ffn_hidden_size", "vocab_size",
                                              "rotary_base", "norm_epsilon", "reward_token_id"))


def test_sampling_shards_keep_held_out_policies_on_evaluation_prompts(tmp_path):
    cfg = DemoConfig(workdir=str(tmp_path), eval_every=3, preference_every=2,
                     runs=(PolicyRun("r", {"prose": 1.0}, (10, 20, 30, 40)),), held_out=("r-20",))
    pipe = DemoPipeline(cfg)
    count = cfg.eval_every * cfg.preference_every
    for policy in ("r-10", "r-20"):
        shards = pipe.shards(policy)
        answered = [i for i in range(60) if i % count in shards]
        if policy == "r-20":  # held out: every evaluation prompt, nothing else
            assert answered == [i for i in range(60) if pipe.is_eval_prompt(f"c{i:06d}")]
        else:  # training: every training prompt, and the preference protocol's prompts
            assert [i for i in answered if pipe.is_eval_prompt(f"c{i:06d}")] == list(
                range(0, 60, count))
            assert {i for i in range(60) if not pipe.is_eval_prompt(f"c{i:06d}")} <= set(answered)


def test_policy_seeds_follow_the_demo_seed(tmp_path):
    run = PolicyRun("r", {"prose": 1.0}, (10,), seed=3)
    seeds = {DemoPipeline(DemoConfig(workdir=str(tmp_path), seed=s)).seeded(run).seed
             for s in (1, 2, 1234)}
    assert len(seeds) == 3


def test_jobs_run_in_worker_processes_in_order_and_errors_surface():
    import operator

    from megatron_polar.demo.workers import run_jobs

    assert run_jobs([(operator.add, (1, 2)), (operator.mul, (3, 4)), (pow, (2, 5))],
                    workers=2, threads=1) == [3, 12, 32]
    with pytest.raises(ZeroDivisionError):
        run_jobs([(operator.truediv, (1, 0))], workers=1, threads=1)


def test_pair_accuracy_splits_outcomes_by_reference_and_rejected_policy():
    from megatron_polar.demo.pipeline import pair_accuracy
    from megatron_polar.eval.discrimination import DiscriminationOutcome

    outcomes = [DiscriminationOutcome(f"w{i}", a, b, 0.0, 0.0, credit)
                for i, (a, b, credit) in enumerate([("x", "y", 1.0), ("x", "y", 0.5),
                                                     ("x", "z", 0.0), ("y", "x", 1.0)])]
    assert pair_accuracy(outcomes) == {"x vs y": {"count": 2, "accuracy": 0.75},
                                       "x vs z": {"count": 1, "accuracy": 0.0},
                                       "y vs x": {"count": 1, "accuracy": 1.0}}


def test_reward_table_averages_per_reference_and_candidate_policy():
    examples = [{"id": f"c{p}/{ref}/{cand}", "reward": r}
                for p, rows in enumerate([{"a": {"a": 1.0, "b": 0.0}, "b": {"a": 2.0, "b": 1.0}},
                                          {"a": {"a": 3.0, "b": 1.0}, "b": {"a": 0.0, "b": 1.0}}])
                for ref, row in rows.items() for cand, r in row.items()]
    table = DemoPipeline.reward_table(examples)
    assert table["a"] == {"a": 2.0, "b": 0.5, "same first": 1.0, "prompts": 2}
    assert table["b"] == {"a": 1.0, "b": 1.0, "same first": 0.5, "prompts": 2}
