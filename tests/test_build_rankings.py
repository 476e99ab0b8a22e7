"""tools/build_triplets.py --from-rankings: ranked responses (best first) -> SFT triplets."""

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_polar.data.build import BuildConfig, BuildError, build_triplets
from megatron_polar.data.indexed import output_paths
from megatron_polar.data.dataset import TripletDataset
from megatron_polar.data.encoding import TripletEncoder
from megatron_polar.data.merge import merge_triplets
from megatron_polar.data.tokenizer import PolarTokenizer
from megatron_polar.testing.tokenizers import make_sentencepiece, sample_text

ROOT = Path(__file__).resolve().parents[1]
# As a user runs it: no torchrun variables (the test process may have its own group's).
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return str(make_sentencepiece(tmp_path_factory.mktemp("tok")))


def cli():
    """tools/build_triplets.py as a module, to call its main() in this process."""
    spec = importlib.util.spec_from_file_location("build_triplets_cli",
                                                  ROOT / "tools/build_triplets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ranked_records(n, n_responses=3, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = n_responses if n_responses else rng.randint(3, 5)
        # Distinct endings: no response equals the reference (which would be rejected).
        rec = {"prompt": sample_text(rng, rng.randint(1, 30)),
               "responses": [sample_text(rng, rng.randint(1, 30)) + f" {r}." for r in range(k)],
               "id": f"r{i}"}
        if i % 5 == 0:
            rec["prompt"] = [{"role": "user", "content": rec["prompt"]}]
        if i % 6 == 0:
            rec["responses"][1] = [{"role": "assistant", "content": rec["responses"][1]}]
        if i % 7 == 0:
            rec["wrapper"] = "pretrain"
        out.append(rec)
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_three_responses_equal_the_triplet_record(tmp_path, tok_path):
    ranked = ranked_records(40)
    triplets = [{"prompt": r["prompt"], "reference": r["responses"][0],
                 "chosen": r["responses"][1], "rejected": r["responses"][2],
                 **({"wrapper": r["wrapper"]} if "wrapper" in r else {})} for r in ranked]
    s = build_triplets(BuildConfig([write_jsonl(tmp_path / "r.jsonl", ranked)],
                                   str(tmp_path / "ranked"), tok_path, from_rankings=True),
                       progress=False)
    build_triplets(BuildConfig([write_jsonl(tmp_path / "t.jsonl", triplets)],
                               str(tmp_path / "plain"), tok_path), progress=False)
    assert (s.read, s.written, s.rejected, s.triplets) == (40, 40, 0, 40)
    for suffix in (".bin", ".idx"):
        assert (Path(tmp_path / f"ranked{suffix}").read_bytes()
                == Path(tmp_path / f"plain{suffix}").read_bytes()), suffix
    meta = json.loads(output_paths(str(tmp_path / "ranked"))["meta"].read_text())
    assert meta["mode"] == "rankings" and meta["triplets"] == 40 and meta["input_lines"] == 40


def test_more_responses_give_every_ordered_pair_in_order(tmp_path, tok_path):
    ranked = ranked_records(12, n_responses=4, seed=1) + ranked_records(3, n_responses=5, seed=2)
    s = build_triplets(BuildConfig([write_jsonl(tmp_path / "r.jsonl", ranked)],
                                   str(tmp_path / "out"), tok_path, from_rankings=True),
                       progress=False)
    assert (s.read, s.written, s.triplets) == (15, 15, 12 * 3 + 3 * 6)
    assert f"{s.triplets} triplets" in s.line()
    ds = IndexedDataset(str(tmp_path / "out"))
    assert len(ds) == 2 * s.triplets and len(ds.document_indices) == s.triplets + 1
    assert len(TripletDataset(str(tmp_path / "out"))) == s.triplets  # the reader's own checks
    enc = TripletEncoder(PolarTokenizer(tok_path))
    doc = 0
    for rec in ranked:
        resp = rec["responses"]
        n = len(resp)
        order = [(1, 2), (1, 3), (2, 3)] if n == 4 else [
            (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
        for i, j in order:
            pos, neg = enc.encode(rec["prompt"], resp[0], resp[i], resp[j],
                                  rec.get("wrapper", "sft"))
            assert ds[2 * doc].tolist() == pos and ds[2 * doc + 1].tolist() == neg, (rec, i, j)
            doc += 1


BAD_RANKED = [
    (b'{"prompt": "p", "responses": ["a", "b", "c"]', "malformed JSON"),
    (b'["p", "a", "b", "c"]', "expected a JSON object"),
    (b'{"prompt": "p", "chosen": "a"}', "missing field 'responses'"),
    (b'{"prompt": "p", "responses": "a b c"}', "field 'responses' must be a list"),
    (b'{"prompt": "p", "responses": ["a", "b"]}', "at least 3 responses, got 2"),
    (b'{"prompt": "p", "responses": ["a", "b", 3]}', "field 'responses[2]' must be a string"),
    (b'{"prompt": "p", "responses": ["a", [{"role": "x"}], "c"]}',
     "field 'responses[1]': message 0 has no string 'content'"),
    (b'{"prompt": 7, "responses": ["a", "b", "c"]}', "field 'prompt' must be a string"),
    (b'{"prompt": "p", "responses": ["a", "b", "c"], "wrapper": "chat"}', "field 'wrapper'"),
    (b'{"prompt": "p", "responses": ["a", "", "c"]}',
     "responses (reference 0, chosen 1, rejected 2): empty response"),
    # Only the last of three triplets is bad: the whole line goes, no triplet of it is kept.
    (b'{"prompt": "p", "responses": ["same", "b", "c", "same"]}',
     "responses (reference 0, chosen 1, rejected 3): the reference is identical"),
]


def test_bad_ranked_lines_are_rejected_whole_with_their_line(tmp_path, tok_path, capsys):
    good = [json.dumps(r).encode() for r in ranked_records(20, n_responses=4, seed=3)]
    lines, bad_at = list(good), {}
    rng = random.Random(4)
    for raw, _ in BAD_RANKED:
        lines.insert(rng.randint(0, len(lines)), raw)
    for number, raw in enumerate(lines, start=1):
        for bad_raw, reason in BAD_RANKED:
            if raw == bad_raw:
                bad_at[number] = reason
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")

    s = build_triplets(BuildConfig([str(src)], str(tmp_path / "out"), tok_path,
                                   from_rankings=True, skip_bad=True), progress=False)
    assert s.read == len(lines) == s.written + s.rejected
    assert (s.written, s.rejected, s.triplets) == (20, len(BAD_RANKED), 20 * 3)
    rejected = [json.loads(l) for l in
                output_paths(str(tmp_path / "out"))["rejected"].read_text().splitlines()]
    assert sorted(r["where"] for r in rejected) == sorted(f"{src}:{n}" for n in bad_at)
    for r in rejected:
        assert bad_at[int(r["where"].rsplit(":", 1)[1])] in r["reason"], r
    assert len(IndexedDataset(str(tmp_path / "out"))) == 2 * s.triplets

    # Without --skip-bad: the first bad line stops the build, exit 1, nothing written.
    first = min(bad_at)
    with pytest.raises(BuildError, match=re.escape(f"{src}:{first}: {bad_at[first]}")):
        build_triplets(BuildConfig([str(src)], str(tmp_path / "x"), tok_path,
                                   from_rankings=True), progress=False)
    assert cli().main(["--input", str(src), "--output-prefix", str(tmp_path / "y"),
                       "--tokenizer", tok_path, "--from-rankings", "--quiet"]) == 1
    assert f"{src}:{first}: " in capsys.readouterr().err
    assert list(tmp_path.glob("x*")) == [] and list(tmp_path.glob("y*")) == []


def test_modes_are_mutually_exclusive(tmp_path, tok_path):
    with pytest.raises(ValueError, match="mutually exclusive"):
        BuildConfig(["x"], "y", tok_path, from_rankings=True, from_trajectories=True)
    with pytest.raises(SystemExit) as e:
        cli().main(["--input", "x", "--output-prefix", "y", "--tokenizer", tok_path,
                    "--from-rankings", "--from-trajectories"])
    assert e.value.code == 2


def test_workers_and_partitions_match_the_single_process_build(tmp_path, tok_path):
    # More lines than one chunk (256) so that both workers get work.
    src = write_jsonl(tmp_path / "in.jsonl", ranked_records(600, n_responses=0, seed=5))
    single = str(tmp_path / "single")
    s = build_triplets(BuildConfig([src], single, tok_path, from_rankings=True), progress=False)
    # The build is timed (summary line), but no upper bound: a loaded machine may be slow.
    assert s.triplets > s.written == 600 and s.seconds > 0
    build_triplets(BuildConfig([src], str(tmp_path / "workers"), tok_path, from_rankings=True,
                               workers=2), progress=False)
    parts = []
    for i in range(3):
        parts.append(str(tmp_path / f"part{i}"))
        build_triplets(BuildConfig([src], parts[-1], tok_path, from_rankings=True, partitions=3,
                                   partition_index=i), progress=False)
    merged = merge_triplets(parts, str(tmp_path / "merged"))
    for other in ("workers", "merged"):
        for suffix in (".bin", ".idx"):
            assert (Path(tmp_path / f"{other}{suffix}").read_bytes()
                    == Path(single + suffix).read_bytes()), (other, suffix)
    assert merged["mode"] == "rankings" and merged["triplets"] == s.triplets
    assert merged["input_lines"] == 600 and merged["sequences"] == 2 * s.triplets


def test_cli_from_rankings_end_to_end(tmp_path, tok_path):
    records = ranked_records(10, n_responses=4, seed=6)
    records.insert(3, {"prompt": "p", "responses": ["a", "b"]})
    src = write_jsonl(tmp_path / "in.jsonl", records)
    proc = subprocess.run([sys.executable, "tools/build_triplets.py", "--from-rankings",
                           "--skip-bad", "--input", src, "--output-prefix", str(tmp_path / "out"),
                           "--tokenizer", tok_path, "--quiet"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read 11 lines = 10 written + 1 rejected; 30 triplets" in proc.stdout
    meta = json.loads(output_paths(str(tmp_path / "out"))["meta"].read_text())
    assert meta["mode"] == "rankings" and meta["triplets"] == 30 and meta["rejected"] == 1
    assert "--from-rankings" in meta["command"]
    (reject,) = output_paths(str(tmp_path / "out"))["rejected"].read_text().splitlines()
    assert json.loads(reject)["where"] == f"{src}:4"
    assert len(IndexedDataset(str(tmp_path / "out"))) == 60


def test_list_documents_hold_each_ranked_list_once(tmp_path, tok_path):
    """--list-documents: one document per list (its candidates, best first) whose ordered
    pairs are exactly the triplets a plain --from-rankings build writes; a list whose
    candidates truncation encodes differently per pair stays as its triplets; the format is
    one older readers refuse, and merging keeps it."""
    from megatron_polar.data.indexed import FORMAT, FORMAT_LISTS, read_meta

    ranked = ranked_records(12, n_responses=4, seed=1) + ranked_records(3, n_responses=5, seed=2)
    src = write_jsonl(tmp_path / "r.jsonl", ranked)
    lists = str(tmp_path / "lists")
    s = build_triplets(BuildConfig([src], lists, tok_path, from_rankings=True,
                                   list_documents=True), progress=False)
    build_triplets(BuildConfig([src], str(tmp_path / "triplets"), tok_path, from_rankings=True),
                   progress=False)
    assert (s.written, s.triplets, s.documents, s.sequences) == (15, 12 * 3 + 3 * 6, 15,
                                                                 12 * 3 + 3 * 4)
    assert "54 triplets in 15 documents" in s.line()
    meta = read_meta(lists)
    assert meta["format"] == FORMAT_LISTS != FORMAT and meta["documents"] == 15
    ds, flat = TripletDataset(lists), TripletDataset(str(tmp_path / "triplets"))
    assert len(ds) == 15 and len(flat) == s.triplets and ds.lists and not flat.lists
    t = 0
    for d in range(len(ds)):
        cands = [c.tolist() for c in ds.document(d)]
        for i in range(len(cands)):
            for j in range(i + 1, len(cands)):
                pos, neg = flat.pair(t)
                assert (pos.tolist(), neg.tolist()) == (cands[i], cands[j]), (d, i, j)
                t += 1
    assert t == len(flat)
    with pytest.raises(Exception, match="not a pair"):
        ds.pair(0)
    # a reader of format /1 alone (the previous release) refuses it by name
    assert meta["format"] != "megatron-polar-triplets/1"
    meta_path = output_paths(lists)["meta"]
    meta_path.write_text(meta_path.read_text().replace(FORMAT_LISTS, "megatron-polar-triplets/9"))
    with pytest.raises(ValueError, match="format 'megatron-polar-triplets/9', expected one of"):
        read_meta(lists)
    meta_path.write_text(json.dumps(meta))
    merged = merge_triplets([lists, lists], str(tmp_path / "merged"))
    assert merged["format"] == FORMAT_LISTS and merged["documents"] == 30
    assert len(TripletDataset(str(tmp_path / "merged"))) == 30
    with pytest.raises(ValueError, match="format"):
        merge_triplets([lists, str(tmp_path / "triplets")], str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="--list-documents needs --from-rankings"):
        BuildConfig([src], "x", tok_path, list_documents=True)


def test_list_whose_truncation_depends_on_the_pair_is_written_as_triplets():
    from megatron_polar.data.build import list_document

    a, b, c = [1, 2, 7], [1, 2, 8, 8], [1, 2, 9]
    assert list_document([a, b, a, c, b, c], 3) == [a, b, c]
    # the prompt was cut shorter in the pair with the long candidate b
    assert list_document([[1, 7], [1, 8, 8], a, c, [1, 8, 8], [1, 9]], 3) is None
