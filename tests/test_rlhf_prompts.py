"""tools/make_rlhf_prompts.py: NeMo-Aligner prompt files and the server's reference file from
POLAR-style records, every line written or rejected, and the reference file usable by the
server's prompt lookup."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_polar.data.rlhf_prompts import make_rlhf_prompts, template_formatter
from tests.tokenizer_fixture import make_sentencepiece

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


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_outputs_rejects_and_split(tmp_path):
    src = write(tmp_path / "in.jsonl", RECORDS)
    s = make_rlhf_prompts([str(src)], tmp_path / "out", template_formatter("U: {prompt}\nA:"),
                          validation_fraction=0.1, seed=3)
    assert (s.read, s.written, s.duplicates, s.rejected) == (len(RECORDS), 23, 1, 5)
    assert s.read == s.written + s.duplicates + s.rejected  # nothing lost
    rejects = read(tmp_path / "out" / "rejects.jsonl")
    reasons = {r["where"].rsplit(":", 1)[1]: r["reason"] for r in rejects}
    assert set(reasons) == {"4", "5", "6", "7", "9"}
    assert "repeats" in reasons["4"] and "in.jsonl:1" in reasons["4"]
    assert "empty prompt" in reasons["5"] and "'prompt'" in reasons["6"]
    assert "JSON" in reasons["7"] and "'reference'" in reasons["9"]

    train, val = read(tmp_path / "out" / "train.jsonl"), read(tmp_path / "out" /
                                                              "validation.jsonl")
    assert (len(train), len(val)) == (s.train, s.validation) == (21, 2)
    refs = read(tmp_path / "out" / "references.jsonl")
    assert sorted(r["text"] for r in refs) == sorted(r["text"] for r in train + val)
    assert refs[0] == {"text": "U: what is one\nA:", "prompt": "what is one",
                       "reference": "one is a number", "wrapper": "sft", "id": "a"}
    assert refs[1]["text"] == "U: tell\na story\nA:"  # messages' contents, joined
    assert refs[2]["wrapper"] == "pretrain"
    # The split depends on the seed only.
    again = make_rlhf_prompts([str(src)], tmp_path / "again", template_formatter("U: {prompt}\nA:"),
                              validation_fraction=0.1, seed=3)
    assert read(tmp_path / "again" / "validation.jsonl") == val and again.validation == 2
    assert not list((tmp_path / "out").glob("*.tmp.*"))  # atomic writes leave nothing behind


def test_reference_file_feeds_the_servers_prompt_lookup(tmp_path):
    from megatron_polar.serving.references import ActorTokenizer, ReferenceTable

    tok = make_sentencepiece(tmp_path)
    src = write(tmp_path / "in.jsonl", [r for r in RECORDS if isinstance(r, dict)])
    make_rlhf_prompts([str(src)], tmp_path / "out", template_formatter("User: {prompt}\n"))
    actor = ActorTokenizer(tok)
    table = ReferenceTable.from_file(tmp_path / "out" / "references.jsonl", actor)
    for text in (r["text"] for r in read(tmp_path / "out" / "train.jsonl")):
        ids = actor.prompt_ids(text)
        entry, n = table.match(ids + actor.text_to_ids(" the model answers"))
        assert entry.text == text and n == len(ids)


def test_cli(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    src = write(tmp_path / "in.jsonl", RECORDS)
    proc = subprocess.run([sys.executable, "tools/make_rlhf_prompts.py", "--input", str(src),
                           "--output-dir", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["written"] == 23
    assert "rejected" in proc.stderr and "in.jsonl:4" in proc.stderr
    proc = subprocess.run([sys.executable, "tools/make_rlhf_prompts.py", "--input", str(src),
                           "--output-dir", str(tmp_path / "bad"), "--prompt-template", "x"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "{prompt}" in proc.stderr
    empty = write(tmp_path / "empty.jsonl", ["{broken"])
    proc = subprocess.run([sys.executable, "tools/make_rlhf_prompts.py", "--input", str(empty),
                           "--output-dir", str(tmp_path / "none")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no prompt written" in proc.stderr


def test_bad_fraction(tmp_path):
    with pytest.raises(ValueError, match="validation-fraction"):
        make_rlhf_prompts([str(write(tmp_path / "in.jsonl", RECORDS))], tmp_path, None, 1.5)
