"""tools/sample_trajectories.py: prompts, pool, truncation, resumable shards, and the build.

The policies are tiny random Llama models with a word-level tokenizer, made on the spot.
"""

import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_polar.generation.pool import (Policy, PoolError, read_pool, resolve_kind,
                                            select_policies)
from megatron_polar.generation.prompts import (Prompt, PromptError, PromptSettings, cut_prefix,
                                               encode_prompt, iter_documents,
                                               load_or_build_prompts, reservoir_sample)
from megatron_polar.generation.sampler import (SamplingConfig, SamplingError,
                                               continuation_decoder, run_sampling)
from megatron_polar.generation.truncation import (cut_incomplete_tail, cut_loop, find_loop,
                                                  truncate)
from megatron_polar.testing.tokenizers import make_sentencepiece, sample_text

ROOT = Path(__file__).resolve().parents[1]
# As a user runs the tool: no torchrun variables (the test process may carry its own group's).
# One thread: the models are tiny, and two OpenMP threads on a busy 2-core machine wait on
# each other at every op (100x slower).
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                       "MASTER_PORT")}, "OMP_NUM_THREADS": "1"}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SMALL = ["--max-new-tokens", "16", "--max-prefix-tokens", "12", "--num-prompts", "8",
         "--num-shards", "2", "--batch-size", "2", "--seed", "7", "--quiet"]


def make_tokenizer(chat: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = [sample_text(rng, rng.randint(3, 15)) + rng.choice([".", "?", "!", ","])
             for _ in range(300)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(
        special_tokens=["<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>"],
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE if chat else None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three policies (base-a without a template, chat-b with one, chat-c marked chat), a JSONL
    corpus and instruction prompts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("sampling")
    for i, (name, chat) in enumerate([("base-a", False), ("chat-b", True), ("chat-c", True)]):
        tok = make_tokenizer(chat)
        tok.save_pretrained(root / "models" / name)
        torch.manual_seed(i)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                             pad_token_id=2)
        LlamaForCausalLM(config).save_pretrained(root / "models" / name)
    (root / "pool.txt").write_text("# name path [kind]\nmodels/base-a\n\n"
                                   "chat-b models/chat-b\nchat-c models/chat-c chat\n")
    rng = random.Random(1)
    with open(root / "corpus.jsonl", "w") as f:
        for _ in range(30):
            doc = " ".join(sample_text(rng, rng.randint(3, 12)) + "." for _ in range(3))
            f.write(json.dumps({"text": doc}) + "\n")
    with open(root / "instructions.jsonl", "w") as f:
        for i in range(4):
            prompt = sample_text(rng, 5) + "?"
            f.write(json.dumps({"prompt": prompt if i % 2 else [{"role": "user",
                                                                  "content": prompt}]}) + "\n")
    return root


def cli(world, output, *extra, expect_rc=0):
    cmd = [sys.executable, str(ROOT / "tools/sample_trajectories.py"), "--policies",
           str(world / "pool.txt"), "--output", str(output), "--corpus",
           str(world / "corpus.jsonl"), "--instructions", str(world / "instructions.jsonl"),
           *SMALL, *extra]
    proc = subprocess.run(cmd, cwd=world, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr[-3000:]
    return proc


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(directory.glob("*/*.jsonl"))
            for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(world):
    out = world / "gen-full"
    cli(world, out)
    return out


# ---- defaults ----------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    spec = importlib.util.spec_from_file_location("sample_trajectories",
                                                  ROOT / "tools/sample_trajectories.py")
    sample_trajectories = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_trajectories)
    args = sample_trajectories.build_parser().parse_args(["--policies", "p", "--output", "o"])
    cfg = SamplingConfig(policies="p", output="o")
    for got in (args, cfg):
        assert (got.temperature, got.top_p, got.top_k) == (1.0, 0.9, 50)
        assert got.max_new_tokens == 4096 and got.samples_per_prompt == 2
        assert (got.min_prefix_tokens, got.max_prefix_tokens) == (1, 1024)
    assert sample_trajectories.config_from_args(args) == cfg
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(policies="p", output="o", top_p=0)


# ---- truncation --------------------------------------------------------------------------------

def test_repetition_loop_is_cut_keeping_its_start():
    rng = random.Random(0)
    text = [rng.randrange(100, 200) for _ in range(40)]
    unit = [7, 8, 9, 10, 11]
    ids = text + [3, 4] + unit * 30
    loop = find_loop(ids)
    assert (loop.start, loop.period) == (42, 5)
    assert cut_loop(ids) == text + [3, 4] + unit * 2
    # One token repeated, a loop of a long unit, and a loop that is the whole generation.
    assert cut_loop(text + [5] * 50) == text + [5, 5]
    long_unit = list(range(300, 400))
    assert cut_loop(text + long_unit * 3) == text + long_unit * 2
    assert cut_loop(unit * 20) == unit * 2
    # Not loops: no repetition, too few repeats, too short a run.
    assert find_loop(text) is None
    assert find_loop(text + long_unit * 2) is None
    assert find_loop(text + [5] * 10) is None

    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    cut = truncate(ids, stopped=False, decode=decode)
    assert cut.kind == "loop" and cut.text == decode(text + [3, 4] + unit * 2)
    assert truncate(text, stopped=True, decode=decode).kind is None


def test_incomplete_tail_is_cut_after_the_last_sentence_end():
    assert cut_incomplete_tail("One. Two! Three? And then the") == "One. Two! Three?"
    assert cut_incomplete_tail('He said "yes." and then') == 'He said "yes."'
    assert cut_incomplete_tail("pi is 3.14 and e is 2.71 or so") is None  # no sentence end
    assert cut_incomplete_tail("def f(x):\n    return x\n  retu") == "def f(x):\n    return x"
    assert cut_incomplete_tail("第一句。第二句没有完") == "第一句。"
    assert cut_incomplete_tail("Complete sentence.") is None  # nothing to remove
    assert cut_incomplete_tail("no end at all") is None
    assert cut_incomplete_tail("\n  dangling") is None  # would leave no text: keep it whole

    words = "One. Two and".split()
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731
    assert truncate([0, 1, 2], stopped=False, decode=decode) == ("One.", "tail")
    assert truncate([0, 1, 2], stopped=True, decode=decode) == ("One. Two and", None)
    assert truncate([1, 2], stopped=False, decode=decode) == ("Two and", None)


def test_continuations_keep_their_leading_space():
    """Sentencepiece-style decoders drop the first token's space; a corpus continuation is
    joined to its prompt with nothing in between, so it must keep it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "\u2581Hello", "\u2581world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert fast.decode([4]) == "world"  # alone: the space is gone
    decode = continuation_decoder(fast, [0, 3])
    assert decode([4]) == " world" and decode([]) == ""
    assert truncate([4] * 40, stopped=False, decode=decode) == (" world world", "loop")


# ---- pool --------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("a models/base-a base extra", "expected 'PATH' or 'NAME PATH'"),
    ("models/missing", "model directory not found"),
    ("base-a models/chat-b", "'base-a' already used at"),
    ("bad/name models/chat-b", "policy name 'bad/name'"),
])
def test_pool_file_errors_name_the_line(world, line, message):
    pool = world / "bad-pool.txt"
    pool.write_text(f"# comment\nmodels/base-a\n\n{line}\n")
    with pytest.raises(PoolError, match=f"{pool}:4: .*{message}"):
        read_pool(str(pool))


def test_pool_names_kinds_and_selection(world):
    pool = read_pool(str(world / "pool.txt"))
    assert [(p.name, p.kind, p.where.rsplit(":", 1)[1]) for p in pool] == [
        ("base-a", None, "2"), ("chat-b", None, "4"), ("chat-c", "chat", "5")]
    assert [p.name for p in select_policies(pool, ["2", "base-a"])] == ["chat-c", "base-a"]
    with pytest.raises(PoolError, match="--policy 'nope'"):
        select_policies(pool, ["nope"])
    chat_tok, base_tok = make_tokenizer(chat=True), make_tokenizer(chat=False)
    assert resolve_kind(pool[0], base_tok) == "base"
    assert resolve_kind(pool[1], chat_tok) == "chat"
    assert resolve_kind(Policy("x", "x", "base", "p:1"), chat_tok) == "base"
    with pytest.raises(PoolError, match="p:1: x is marked 'chat'"):
        resolve_kind(Policy("x", "x", "chat", "p:1"), base_tok)


# ---- prompts -----------------------------------------------------------------------------------

def test_prefixes_are_cut_in_the_original_text_and_documents_sampled_deterministically(tmp_path):
    tok = make_tokenizer(chat=False)
    text = "the cat ,  sat   on a mat. why"
    assert cut_prefix(text, 3, tok) == "the cat ,"
    assert cut_prefix(text, 6, tok) == "the cat ,  sat   on a"
    assert cut_prefix(text, 100, tok) == text
    long = " ".join(["river"] * 5000)
    assert cut_prefix(long, 1000, tok) == " ".join(["river"] * 1000)

    assert reservoir_sample(range(1000), 5, random.Random(3)) == \
        reservoir_sample(range(1000), 5, random.Random(3))
    assert reservoir_sample(range(3), 5, random.Random(3)) == [0, 1, 2]

    # Plain text (documents between blank lines) and gzip.
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(b"first doc\nline two\n\n\n\nsecond\n"))
    assert list(iter_documents([str(tmp_path / "a.txt.gz")], "text")) == [
        (f"{tmp_path}/a.txt.gz:1", "first doc\nline two"), (f"{tmp_path}/a.txt.gz:6", "second")]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    with pytest.raises(PromptError, match="b.jsonl:2: no string field 'text'"):
        list(iter_documents([str(tmp_path / "b.jsonl")], "text"))


def test_prompt_set_is_built_once_and_refused_with_other_settings(world, tmp_path):
    settings = PromptSettings(corpus=(str(world / "corpus.jsonl"),), num_prompts=6,
                              max_prefix_tokens=8, prefix_tokenizer=str(world / "models/base-a"),
                              instructions=(str(world / "instructions.jsonl"),), seed=5)
    calls = []

    def load(path):
        calls.append(path)
        return make_tokenizer(chat=False)

    first = load_or_build_prompts(str(tmp_path), settings, load)
    assert [(i, p.prompt_id) for i, p in first] == list(enumerate(
        [f"c{i:06d}" for i in range(6)] + [f"i{i:06d}" for i in range(4)]))
    tok = make_tokenizer(False)
    assert all(1 <= len(tok(p.prompt, add_special_tokens=False)["input_ids"]) <= 8
               and p.source.startswith(str(world / "corpus.jsonl:"))
               for _, p in first if p.kind == "corpus")
    again = load_or_build_prompts(str(tmp_path), settings, load, select=lambda i: i % 3 == 1)
    assert again == first[1::3] and len(calls) == 1  # read back, not rebuilt
    other = PromptSettings(**{**settings.__dict__, "seed": 6})
    with pytest.raises(PromptError, match="other prompt settings .*seed: 5 there, 6 now"):
        load_or_build_prompts(str(tmp_path), other, load)
    # Same settings in a fresh directory give the same file, byte for byte.
    load_or_build_prompts(str(tmp_path / "b"), settings, load)
    assert (tmp_path / "b/prompts.jsonl").read_bytes() == (tmp_path / "prompts.jsonl").read_bytes()


def test_chat_policies_get_instructions_through_their_template(world, full_run):
    chat_tok = make_tokenizer(chat=True)
    instruction = Prompt("i000000", "instruction", "why is the river two?", "x:1")
    assert chat_tok.decode(encode_prompt(chat_tok, instruction)) == \
        "<s> <|user|> why is the river two ? <|assistant|>"
    corpus = Prompt("c000000", "corpus", "the cat sat", "x:1")
    assert encode_prompt(chat_tok, corpus) == chat_tok("the cat sat")["input_ids"]  # raw text

    recs = records(full_run)
    by_policy = {}
    for r in recs:
        by_policy.setdefault(r["policy"], set()).add(r["kind"])
        assert r["wrapper"] == ("sft" if r["kind"] == "instruction" else "pretrain")
        assert r["finish_reason"] in ("stop", "length") and r["trajectory"].strip()
        assert r["truncation"] in (None, "tail", "loop")
        assert r["sampling"]["top_k"] == 50 and r["sampling"]["max_new_tokens"] == 16
    assert by_policy == {"base-a": {"corpus"}, "chat-b": {"corpus", "instruction"},
                         "chat-c": {"corpus", "instruction"}}
    order = [json.loads(line)["prompt_id"] for line in
             (full_run / "prompts.jsonl").read_text().splitlines()]
    assert set(order) == {r["prompt_id"] for r in recs if r["policy"] != "base-a"}
    # Prompt i is in shard i % 2 for every policy.
    for p in sorted(full_run.glob("*/shard-*.jsonl")):
        shard = int(p.name.split("-")[1])
        assert all(order.index(json.loads(line)["prompt_id"]) % 2 == shard
                   for line in p.read_text().splitlines())


# ---- resume ------------------------------------------------------------------------------------

def test_a_crashed_and_restarted_run_writes_the_same_bytes(world, full_run):
    out = world / "gen-crash"
    cli(world, out, "--exit-after-batches", "5", expect_rc=3)
    partials = sorted(out.glob("*/*.partial"))
    assert len(partials) == 1
    # Tear the last batch as a crash mid-write would: drop a record and half of another.
    data = partials[0].read_bytes()
    lines = data.split(b"\n")[:-1]
    assert len(lines) >= 2
    partials[0].write_bytes(b"\n".join(lines[:-2]) + b"\n" + lines[-2][: len(lines[-2]) // 2])
    cli(world, out)
    assert not list(out.glob("*/*.partial"))
    assert tree(out) == tree(full_run)
    # A finished run is skipped entirely.
    proc = cli(world, out)
    assert "0 trajectories written" in proc.stdout


def test_run_sampling_reports_progress_and_skips_finished_shards(world, tmp_path):
    cfg = SamplingConfig(policies=str(world / "pool.txt"), output=str(tmp_path),
                         instructions=(str(world / "instructions.jsonl"),), max_new_tokens=8,
                         samples_per_prompt=3, batch_size=3, policy=("chat-c",), seed=3,
                         num_shards=2, shard_index=1)
    seen = []
    s = run_sampling(cfg, progress=seen.append)
    assert s.written == sum(seen) == 2 * 3 and s.skipped == 0 and s.tokens > 0
    assert len(records(tmp_path)) == s.written - s.empty
    assert {r["prompt_id"] for r in records(tmp_path)} <= {"i000001", "i000003"}
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "chat-c", "chat-c/shard-00001-of-00002.jsonl", "prompts.jsonl", "prompts.meta.json"]
    again = run_sampling(cfg, progress=seen.append)
    assert (again.written, again.skipped) == (0, s.written - s.empty)
    with pytest.raises(SamplingError, match="other sampling settings .*top_k: 50 there, 40 now"):
        run_sampling(SamplingConfig(**{**cfg.__dict__, "top_k": 40}))


def test_slurm_array_maps_tasks_to_policy_and_shard(world):
    script = ROOT / "slurm/sample_trajectories_array.sh"
    exe = shutil.which("shellcheck")
    if exe is not None:
        lint = subprocess.run([exe, "-x", str(script)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    env = {"PATH": "/usr/bin:/bin", "POLICIES": str(world / "pool.txt"), "OUTPUT": "/out",
           "NUM_SHARDS": "4", "CORPUS": "/c/*.jsonl.gz /d/more.txt", "NUM_PROMPTS": "100",
           "EXTRA_ARGS": "--max-new-tokens 2048", "DRY_RUN": "1", "REPO": "/repo"}
    out = subprocess.run(["bash", str(script), "--seed", "9"], env={
        **env, "SLURM_ARRAY_TASK_ID": "9"}, capture_output=True, text=True, check=True).stdout
    assert "--shard-index 1 --policy 2" in out  # 3 policies x 4 shards: task 9 = (2, 1)
    assert "--corpus /c/\\*.jsonl.gz /d/more.txt --num-prompts 100" in out
    assert out.strip().endswith("--max-new-tokens 2048 --seed 9")
    beyond = subprocess.run(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": "12"},
                            capture_output=True, text=True)
    assert beyond.returncode == 1 and "--array=0-11" in beyond.stderr


# ---- the triplet build -------------------------------------------------------------------------

def test_output_builds_into_triplets(world, full_run, tmp_path):
    tok = make_sentencepiece(tmp_path)
    proc = subprocess.run(
        [sys.executable, "tools/build_triplets.py", "--from-trajectories", "--input",
         str(full_run / "*" / "*.jsonl"), "--output-prefix", str(tmp_path / "pt"),
         "--tokenizer", str(tok), "--quiet"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads((tmp_path / "pt.meta.json").read_text())
    # Corpus prompts: 3 policies; instruction prompts: the 2 chat policies.
    assert meta["triplets"] > 8
