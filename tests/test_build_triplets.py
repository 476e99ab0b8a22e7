"""tools/build_triplets.py and tools/merge_triplets.py: round trip, bad input, shards, trajectories."""

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_polar.data.build import BuildConfig, BuildError, build_triplets
from megatron_polar.data.indexed import output_paths
from megatron_polar.data.encoding import TripletEncoder
from megatron_polar.data.tokenizer import PolarTokenizer
from megatron_polar.testing.tokenizers import make_sentencepiece, sample_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return str(make_sentencepiece(tmp_path_factory.mktemp("tok")))


def good_records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"prompt": sample_text(rng, rng.randint(1, 30)),
               "reference": sample_text(rng, rng.randint(0, 40)),
               "chosen": sample_text(rng, rng.randint(1, 40)),
               "rejected": sample_text(rng, rng.randint(1, 40)) + " !"}
        if i % 5 == 0:
            rec["prompt"] = [{"role": "user", "content": rec["prompt"]}]
        if i % 7 == 0:
            rec["wrapper"] = "pretrain"
        out.append(rec)
    return out


def write_jsonl(path, records, gz=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return str(path)


def test_round_trip_matches_encoder_and_megatron_reads_it(tmp_path, tok_path):
    records = good_records(60)
    a = write_jsonl(tmp_path / "a.jsonl", records[:30])
    b = write_jsonl(tmp_path / "b.jsonl.gz", records[30:], gz=True)
    summary = build_triplets(BuildConfig([a, str(tmp_path / "*.gz")], str(tmp_path / "out"),
                                         tok_path), progress=False)
    assert (summary.read, summary.written, summary.rejected) == (60, 60, 0)
    ds = IndexedDataset(str(tmp_path / "out"))  # megatron-core opens it directly
    assert len(ds) == 120 and len(ds.document_indices) == 61
    enc = TripletEncoder(PolarTokenizer(tok_path))
    for i, rec in enumerate(records):
        pos, neg = enc.encode(rec["prompt"], rec["reference"], rec["chosen"], rec["rejected"],
                              rec.get("wrapper", "sft"))
        assert ds[2 * i].tolist() == pos and ds[2 * i + 1].tolist() == neg
    meta = json.loads(output_paths(str(tmp_path / "out"))["meta"].read_text())
    assert meta["triplets"] == 60 and meta["tokens"] == int(ds.sequence_lengths.sum())
    assert meta["tokenizer"]["sha256"] == PolarTokenizer(tok_path).identity().sha256
    assert meta["inputs"] == [a, b]


BAD_LINES = [
    (b'{"prompt": "p", "reference": "r", "chosen": "c"', "malformed JSON"),
    (b'{"prompt": "p", "reference": "r", "chosen": "c"}', "missing field 'rejected'"),
    (b'{"prompt": "p", "reference": 3, "chosen": "c", "rejected": "n"}',
     "field 'reference' must be a string"),
    (b'{"prompt": "p", "reference": "r", "chosen": "", "rejected": "n"}', "empty response"),
    (b'{"prompt": "p", "reference": "\xff\xfe", "chosen": "c", "rejected": "n"}', "invalid UTF-8"),
    (b'{"prompt": "p", "reference": "same", "chosen": "c", "rejected": "same"}',
     "identical to the rejected"),
    (b'[1, 2]', "expected a JSON object"),
    (b'{"prompt": "p", "reference": "r", "chosen": "c", "rejected": "n", "wrapper": "x"}',
     "field 'wrapper'"),
]


def mixed_input(path, seed):
    rng = random.Random(seed)
    good = good_records(40, seed)
    lines = [json.dumps(r).encode() for r in good]
    bad_at = {}
    for raw, reason in BAD_LINES + [rng.choice(BAD_LINES) for _ in range(5)]:
        pos = rng.randint(0, len(lines))
        lines.insert(pos, raw)
    for i, raw in enumerate(lines):
        for bad_raw, reason in BAD_LINES:
            if raw == bad_raw:
                bad_at[i + 1] = reason
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), len(lines), bad_at


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_skip_bad_accounts_for_every_line(tmp_path, tok_path, seed):
    src, n_lines, bad_at = mixed_input(tmp_path / "in.jsonl", seed)
    summary = build_triplets(BuildConfig([src], str(tmp_path / "out"), tok_path, skip_bad=True),
                             progress=False)
    assert summary.read == n_lines == summary.written + summary.rejected
    rejected = [json.loads(l) for l in
                output_paths(str(tmp_path / "out"))["rejected"].read_text().splitlines()]
    assert {r["where"]: r["reason"] for r in rejected}.keys() == {f"{src}:{n}" for n in bad_at}
    for r in rejected:
        assert bad_at[int(r["where"].rsplit(":", 1)[1])] in r["reason"]
    assert len(IndexedDataset(str(tmp_path / "out"))) == 2 * summary.written


def test_without_skip_bad_the_cli_fails_naming_the_line_and_writes_nothing(tmp_path, tok_path):
    src, _, bad_at = mixed_input(tmp_path / "in.jsonl", 4)
    first_bad = min(bad_at)
    proc = subprocess.run([sys.executable, "tools/build_triplets.py", "--input", src,
                           "--output-prefix", str(tmp_path / "out"), "--tokenizer", tok_path,
                           "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{src}:{first_bad}: {bad_at[first_bad]}" in proc.stderr
    assert list(tmp_path.glob("out*")) == []


def test_workers_and_partitions_merge_byte_for_byte(tmp_path, tok_path):
    src = write_jsonl(tmp_path / "in.jsonl", good_records(300, seed=9))
    single = str(tmp_path / "single")
    build_triplets(BuildConfig([src], single, tok_path), progress=False)
    parallel = str(tmp_path / "parallel")
    build_triplets(BuildConfig([src], parallel, tok_path, workers=2), progress=False)
    parts = []
    for i in range(3):
        prefix = str(tmp_path / f"part{i}")
        subprocess.run([sys.executable, "tools/build_triplets.py", "--input", src,
                        "--output-prefix", prefix, "--tokenizer", tok_path, "--partitions", "3",
                        "--partition-index", str(i), "--quiet"], cwd=ROOT, check=True,
                       capture_output=True, timeout=120)
        parts.append(prefix)
    merged = str(tmp_path / "merged")
    subprocess.run([sys.executable, "tools/merge_triplets.py", "--inputs", *parts,
                    "--output-prefix", merged], cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    for other in (parallel, merged):
        for suffix in (".bin", ".idx"):
            assert Path(other + suffix).read_bytes() == Path(single + suffix).read_bytes(), suffix
    meta = json.loads(Path(merged + ".meta.json").read_text())
    assert meta["triplets"] == 300 and meta["input_lines"] == 300


def test_merge_refuses_another_tokenizer(tmp_path, tok_path):
    from megatron_polar.data.merge import merge_triplets

    src = write_jsonl(tmp_path / "in.jsonl", good_records(5))
    build_triplets(BuildConfig([src], str(tmp_path / "a"), tok_path), progress=False)
    build_triplets(BuildConfig([src], str(tmp_path / "b"), tok_path, reward_token_id=9),
                   progress=False)
    with pytest.raises(ValueError, match="tokenizer .* differs"):
        merge_triplets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))


def test_from_trajectories_assembles_deterministic_triplets(tmp_path, tok_path):
    rng = random.Random(3)
    rows = []
    for pid in range(20):
        prompt = sample_text(rng, 5)
        for policy in ("base-a", "chat-b", "ckpt-c"):
            for _ in range(2 if policy != "ckpt-c" else 1):
                rows.append({"prompt_id": f"p{pid}", "prompt": prompt, "policy": policy,
                             "trajectory": sample_text(rng, rng.randint(3, 20))})
    rows.append({"prompt_id": "p0", "prompt": "x", "policy": "base-a"})  # no trajectory field
    src = write_jsonl(tmp_path / "traj.jsonl", rows)
    with pytest.raises(BuildError, match=f"{src}:{len(rows)}: missing field 'trajectory'"):
        build_triplets(BuildConfig([src], str(tmp_path / "x"), tok_path, from_trajectories=True),
                       progress=False)
    s1 = build_triplets(BuildConfig([src], str(tmp_path / "t1"), tok_path,
                                    from_trajectories=True, skip_bad=True, seed=5), progress=False)
    build_triplets(BuildConfig([src], str(tmp_path / "t2"), tok_path,
                                    from_trajectories=True, skip_bad=True, seed=5), progress=False)
    assert s1.written == 40  # one triplet per prompt for each policy with two trajectories
    assert s1.rejected == 1 and s1.read == len(rows)
    assert 0 <= s1.unused < len(rows) - 1  # third trajectories of a policy may go unused
    assert Path(tmp_path / "t1.bin").read_bytes() == Path(tmp_path / "t2.bin").read_bytes()
    ds = IndexedDataset(str(tmp_path / "t1"))
    tok = PolarTokenizer(tok_path)
    pos, neg = ds[0].tolist(), ds[1].tolist()
    cut = pos.index(tok.separator_id)
    assert pos[:cut] == neg[:cut]  # shared prompt + reference
    assert np.all(ds.sequence_lengths > 0)


def test_slurm_array_dry_run_builds_its_partition():
    env = {"INPUT": "data/*.jsonl.gz", "OUTPUT": "/out/polar", "TOKENIZER": "/tok",
           "DRY_RUN": "1", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_CPUS_PER_TASK": "32", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["bash", "slurm/build_triplets_array.sh"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "--partitions 8 --partition-index 3" in out
    assert "--output-prefix /out/polar.part3" in out and "--workers 32" in out
    assert subprocess.run(["bash", "-n", "slurm/build_triplets_array.sh"], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("seed", [11, 12])
def test_fuzzed_lines_are_written_or_rejected_never_lost(tmp_path, tok_path, seed):
    rng = random.Random(seed)
    lines = []
    for rec in good_records(150, seed):
        raw = bytearray(json.dumps(rec).encode())
        kind = rng.randrange(5)
        if kind == 1:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        elif kind == 2:  # cut short
            raw = raw[: rng.randrange(len(raw))]
        elif kind == 3:  # a random field set to another JSON type
            rec = dict(rec)
            rec[rng.choice(["prompt", "reference", "chosen", "rejected"])] = rng.choice(
                [None, 3, 1.5, True, {"a": 1}, [1, 2]])
            raw = bytearray(json.dumps(rec).encode())
        raw = raw.replace(b"\n", b" ")
        lines.append(bytes(raw))
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    summary = build_triplets(BuildConfig([str(src)], str(tmp_path / "out"), tok_path,
                                         skip_bad=True), progress=False)
    nonblank = sum(1 for raw in lines if raw.strip())
    assert summary.read == nonblank == summary.written + summary.rejected
    assert summary.rejected > 0 and summary.written > 0
    rejected = output_paths(str(tmp_path / "out"))["rejected"].read_text().splitlines()
    assert len(rejected) == summary.rejected
    assert all(json.loads(r)["where"].startswith(f"{src}:") and json.loads(r)["reason"]
               for r in rejected)
    assert len(IndexedDataset(str(tmp_path / "out"))) == 2 * summary.written


def test_merge_sums_the_special_text_count(tmp_path, tok_path):
    from megatron_polar.data.merge import merge_triplets

    tok = PolarTokenizer(tok_path)
    special = sorted(tok.special_texts)[0]  # the text of one special token, e.g. "</s>"
    parts = []
    for name, n in (("a", 2), ("b", 3)):
        records = good_records(6)
        for r in records[:n]:
            r["chosen"] = f"strike {special} through"
        src = write_jsonl(tmp_path / f"{name}.jsonl", records)
        summary = build_triplets(BuildConfig([src], str(tmp_path / name), tok_path),
                                 progress=False)
        assert summary.special_text_lines == n
        parts.append(str(tmp_path / name))
    assert merge_triplets(parts, str(tmp_path / "m"))["special_text_lines"] == 5
