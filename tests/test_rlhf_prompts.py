"""tools/make_rlhf_prompts.py: NeMo-Aligner prompt files and the server's reference file from
POLAR-style records, every line written or rejected, and the reference file usable by the
server's prompt lookup."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_polar.data import rlhf_prompts
from megatron_polar.data.rlhf_prompts import (chat_template_formatter, make_rlhf_prompts,
                                              prefix_texts, template_formatter, validation_size)
from megatron_polar.testing.tokenizers import make_sentencepiece, sample_text

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {"prompt": "what is one", "reference": "one is a number", "id": "a"},
    {"prompt": [{"role": "user", "content": "tell"}, {"role": "user", "content": "a story"}],
     "reference": [{"role": "assistant", "content": "the cat sat"}]},
    {"prompt": "what is one", "reference": "one is a number", "id": "a"},  # exact repeat
    {"prompt": "what is one", "reference": "something else"},  # conflicting repeat
    {"prompt": "   ", "reference": "x"},
    {"reference": "no prompt"},
    "{broken",
    {"prompt": "what is one plus two", "reference": "three", "wrapper": "pretrain"},
    {"prompt": "why", "reference": 5},
]
for k in range(20):
    RECORDS.append({"prompt": f"apple {k} river", "reference": f"mountain {k}"})
# As a user runs the tool: no torchrun variables (the test process may carry its group's).
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('roles must be user or assistant') }}{% endif %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def cli(*args):
    return subprocess.run([sys.executable, "tools/make_rlhf_prompts.py", *map(str, args)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def test_outputs_rejects_and_split(tmp_path):
    src = write(tmp_path / "in.jsonl", RECORDS)
    fmt = template_formatter("U: {prompt}\nA:")
    s = make_rlhf_prompts([str(src)], tmp_path / "out", fmt, validation_fraction=0.1, seed=3)
    assert (s.read, s.written, s.duplicates, s.rejected) == (len(RECORDS), 23, 1, 5)
    assert s.read == s.written + s.duplicates + s.rejected  # nothing lost
    rejects = read(tmp_path / "out" / "rejects.jsonl")
    reasons = {r["where"]: r["reason"] for r in rejects}
    assert set(reasons) == {f"{src}:{n}" for n in (4, 5, 6, 7, 9)}
    assert "repeats" in reasons[f"{src}:4"] and f"{src}:1" in reasons[f"{src}:4"]
    assert "empty prompt" in reasons[f"{src}:5"] and "'prompt'" in reasons[f"{src}:6"]
    assert "JSON" in reasons[f"{src}:7"] and "'reference'" in reasons[f"{src}:9"]

    out = tmp_path / "out"
    train, val = read(out / "train.jsonl"), read(out / "validation.jsonl")
    assert (len(train), len(val)) == (s.train, s.validation) == (21, 2)
    assert all(set(r) == {"text"} for r in train + val)  # NeMo-Aligner's prompt format
    refs = read(out / "references.jsonl")
    assert sorted(r["text"] for r in refs) == sorted(r["text"] for r in train + val)
    assert refs[0] == {"text": "U: what is one\nA:", "prompt": "what is one",
                       "reference": "one is a number", "wrapper": "sft", "id": "a"}
    assert refs[1]["text"] == "U: tell\na story\nA:"  # messages' contents, joined
    assert refs[1]["prompt"] == RECORDS[1]["prompt"]  # the RM still gets the messages
    assert refs[2]["wrapper"] == "pretrain"
    assert not s.warnings  # the template ends every prompt: no text starts another
    # The split depends on the input and the seed only.
    again = make_rlhf_prompts([str(src)], tmp_path / "again", fmt, 0.1, seed=3)
    assert read(tmp_path / "again" / "validation.jsonl") == val and again.validation == 2
    assert not list(out.glob("*.tmp.*"))


def test_validation_sizes_and_seeded_split(tmp_path):
    assert [validation_size(n, 0.01) for n in (0, 1, 2, 3, 50, 1000)] == [0, 0, 1, 1, 1, 10]
    assert validation_size(4, 0.9) == 3  # train keeps one prompt
    rng = random.Random(0)
    src = write(tmp_path / "in.jsonl", [{"prompt": f"{k} {sample_text(rng, 4)}",
                                         "reference": "r"} for k in range(300)])

    def split(seed, name):
        s = make_rlhf_prompts([str(src)], tmp_path / name, None, 0.05, seed)
        assert (s.train, s.validation) == (285, 15)
        return {r["text"] for r in read(tmp_path / name / "validation.jsonl")}

    assert split(1, "a") == split(1, "b") != split(2, "c")
    one = write(tmp_path / "one.jsonl", [{"prompt": "only", "reference": "r"}])
    s = make_rlhf_prompts([str(one)], tmp_path / "one", None)
    assert (s.train, s.validation) == (1, 0) and "validation.jsonl is empty" in s.warnings[0]


def test_prompt_that_starts_another_is_warned(tmp_path):
    assert prefix_texts(["ab", "b", "abc", "a", "ba"]) == [("a", "ab"), ("ab", "abc"),
                                                           ("b", "ba")]
    src = write(tmp_path / "in.jsonl", [r for r in RECORDS if isinstance(r, dict)])
    s = make_rlhf_prompts([str(src)], tmp_path / "out", template_formatter("{prompt}"))
    assert len(s.warnings) == 1 and "'what is one' starts" in s.warnings[0]


def test_chat_template_from_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(tmp_path / "actor")
    src = write(tmp_path / "in.jsonl", [
        {"prompt": "hi there", "reference": "hello"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}], "reference": "d"},
        {"prompt": [{"role": "system", "content": "x"}], "reference": "y"},
        {"prompt": [{"content": "no role"}], "reference": "y"}])
    fmt = chat_template_formatter(str(tmp_path / "actor"))
    s = make_rlhf_prompts([str(src)], tmp_path / "out", fmt, 0.5)
    assert (s.written, s.rejected) == (2, 2)
    refs = read(tmp_path / "out" / "references.jsonl")
    assert refs[0]["text"] == "<|user|>\nhi there\n<|assistant|>\n"
    assert refs[1]["text"] == "<|user|>\na\n<|assistant|>\nb\n<|user|>\nc\n<|assistant|>\n"
    assert refs[0]["prompt"] == "hi there"  # the RM sees the plain prompt, not the template
    reasons = {r["where"]: r["reason"] for r in read(tmp_path / "out" / "rejects.jsonl")}
    assert "user or assistant" in reasons[f"{src}:3"]
    assert "'role'" in reasons[f"{src}:4"]
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no chat template"):
        chat_template_formatter(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        chat_template_formatter(str(tmp_path / "missing"))


def test_failed_write_leaves_previous_outputs(tmp_path, monkeypatch):
    src = write(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out"
    make_rlhf_prompts([str(src)], out, template_formatter("Q: {prompt}\n"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls, dumps = [], json.dumps

    def failing_dumps(obj, **kw):  # dies in the middle of the first file written
        calls.append(obj)
        if len(calls) == 5:
            raise OSError("disk full")
        return dumps(obj, **kw)

    monkeypatch.setattr(rlhf_prompts.json, "dumps", failing_dumps)
    with pytest.raises(OSError, match="disk full"):
        make_rlhf_prompts([str(src)], out, template_formatter("Other: {prompt}\n"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, no tmp
    # The reference file goes first, and had 4 rows out when the write failed.
    assert all("reference" in row for row in calls) and len(calls) == 5


def test_reference_file_feeds_the_servers_prompt_lookup(tmp_path):
    from megatron_polar.serving.references import ActorTokenizer, ReferenceTable

    tok = make_sentencepiece(tmp_path)
    src = write(tmp_path / "in.jsonl", [r for r in RECORDS if isinstance(r, dict)])
    make_rlhf_prompts([str(src)], tmp_path / "out", template_formatter("User: {prompt}\n"))
    actor = ActorTokenizer(tok)
    table = ReferenceTable.from_file(tmp_path / "out" / "references.jsonl", actor)
    texts = [r["text"] for r in read(tmp_path / "out" / "train.jsonl")
             + read(tmp_path / "out" / "validation.jsonl")]
    assert len(table) == len(texts) == 23
    refs = {r["text"]: r for r in read(tmp_path / "out" / "references.jsonl")}
    for text in texts:
        ids = actor.prompt_ids(text)
        entry, n = table.match(ids + actor.text_to_ids(" the model answers"))
        assert entry.text == text and n == len(ids)
        assert entry.reference == refs[text]["reference"]


def test_cli(tmp_path):
    src = write(tmp_path / "in.jsonl", RECORDS)
    proc = cli("--input", src, "--output-dir", tmp_path / "out", "--validation-fraction", "0.1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == {"read": 29, "written": 23, "train": 21, "validation": 2,
                       "duplicates": 1, "rejected": 5}
    assert f"rejected {src}:4" in proc.stderr and "warning:" in proc.stderr  # plain prompts
    assert len(read(tmp_path / "out" / "rejects.jsonl")) == 5
    proc = cli("--input", src, "--output-dir", tmp_path / "bad", "--prompt-template", "x")
    assert proc.returncode == 2 and "{prompt}" in proc.stderr
    proc = cli("--input", write(tmp_path / "empty.jsonl", ["{broken", "[1]"]), "--output-dir",
               tmp_path / "none", "--reject-file", tmp_path / "why.jsonl")
    assert proc.returncode == 2 and "no prompt written" in proc.stderr
    assert [r["where"][-2:] for r in read(tmp_path / "why.jsonl")] == [":1", ":2"]


@pytest.mark.parametrize("fraction", [0, 1, 1.5])
def test_bad_fraction(tmp_path, fraction):
    with pytest.raises(ValueError, match="validation-fraction"):
        make_rlhf_prompts([str(write(tmp_path / "in.jsonl", RECORDS))], tmp_path, None,
                          fraction)
