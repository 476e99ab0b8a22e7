"""Evaluation: preference protocol and policy discrimination with rule-based scorers whose
answers are known exactly, input errors naming file:line, and the CLI end to end on a real
tiny model, its rewards checked against `python -m megatron_polar.score`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_polar.data.encoding import field_text
from megatron_polar.eval.discrimination import discrimination_accuracy, load_policy_triplets
from megatron_polar.eval.preference import EvalInputError, preference_accuracy, read_ranked
from megatron_polar.testing.tokenizers import make_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"


def overlap_score(records):
    """A rule with a known answer: words the candidate shares with the reference."""
    return [float(len(set(field_text(r.reference, "ref").split())
                      & set(field_text(r.candidate, "cand").split()))) for r in records]


def ranked(prompt, ref, better, worse, category=None, **extra):
    rec = {"prompt": prompt, "responses": [ref, better, worse], **extra}
    if category is not None:
        rec["category"] = category
    return rec


# Overlaps with the reference "the cat sat on a mat" decide each record:
RANKED = [
    # chat: right, wrong, tie, right -> 2.5 / 4
    ranked("what sat", "the cat sat on a mat", "the cat sat", "a dog", "chat"),
    ranked("what sat", "the cat sat on a mat", "a river", "the cat on", "chat"),
    ranked([{"role": "user", "content": "why"}], "the cat sat on a mat",
           [{"role": "assistant", "content": "cat mat"}], "the sat", "chat"),
    ranked("how", "the cat sat on a mat", "cat sat on mat", "one two three four", "chat",
           wrapper="pretrain"),
    # code: wrong twice -> 0 / 2
    ranked("code", "the cat sat on a mat", "model train", "the cat", "code"),
    ranked("code", "the cat sat on a mat", "data", "mat", "code"),
    # math: right -> 1 / 1
    ranked("two plus two", "the cat sat on a mat", "the cat", "four", "math"),
]
# micro 3.5 / 7; macro (0.625 + 0 + 1) / 3


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def test_preference_accuracy_per_category_micro_and_macro(tmp_path):
    seen = []

    def score(records):
        seen.extend(records)
        return overlap_score(records)

    records = RANKED[:3] + [dict(RANKED[3], responses=RANKED[3]["responses"] + ["a fourth"])]
    path = write_jsonl(tmp_path / "ranked.jsonl", records + [""] + RANKED[4:])
    report = preference_accuracy([str(path)], score)
    assert list(report.categories) == ["chat", "code", "math"]
    chat, code, math = (report.categories[c] for c in ("chat", "code", "math"))
    assert (chat.count, chat.correct, chat.ties, chat.accuracy) == (4, 2.5, 1, 0.625)
    assert (code.count, code.correct, code.accuracy) == (2, 0.0, 0.0)
    assert (math.count, math.accuracy) == (1, 1.0)
    assert (report.overall.count, report.overall.correct, report.overall.ties) == (7, 3.5, 1)
    assert report.overall.accuracy == 0.5
    assert report.macro_accuracy == pytest.approx((0.625 + 0 + 1) / 3)
    assert [o.credit for o in report.outcomes] == [1, 0, 0.5, 1, 0, 0, 1]
    # Reference is the 1st response, chosen the 2nd, rejected the 3rd; the 4th is unused;
    # `where` names line and response; the wrapper is passed on; blank lines are skipped.
    assert len(seen) == 14 and seen[6].candidate == "cat sat on mat"
    assert seen[7].candidate == "one two three four" and seen[7].wrapper == "pretrain"
    assert seen[0].wrapper == "sft" and seen[0].where == f"{path}:1 (responses[1])"
    assert report.outcomes[4].where == f"{path}:6"
    d = report.as_dict()
    assert d["categories"]["chat"] == {"count": 4, "correct": 2.5, "ties": 1, "accuracy": 0.625}
    assert d["records"][0]["chosen_reward"] == 3.0 and d["records"][0]["rejected_reward"] == 1.0
    table = report.table()
    assert "0.6250" in table and "mean over categories" in table


def test_preference_category_field_and_uncategorized(tmp_path):
    records = [{k: v for k, v in r.items() if k != "category"} for r in RANKED]
    records[0]["domain"] = "x"
    records[1]["domain"] = 3  # an integer category reads as its string
    path = write_jsonl(tmp_path / "r.jsonl", records)
    report = preference_accuracy([str(path)], overlap_score, category_field="domain")
    assert {n: a.count for n, a in report.categories.items()} == {"3": 1, "uncategorized": 5,
                                                                  "x": 1}
    assert report.overall.accuracy == 0.5


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt": "p", "responses": ["a", "b"]}', "at least 3 responses, got 2"),
    ('{"prompt": "p", "responses": ["a", "b", "c"', "malformed JSON"),
    ('{"prompt": "p"}', "missing field 'responses'"),
    ('{"prompt": "p", "responses": ["a", "b", 3]}', "responses[2]"),
    ('{"prompt": "p", "responses": ["a", "b", "c"], "category": ["x"]}', "'category'"),
    ('{"prompt": "p", "responses": ["a", "b", "c"], "wrapper": "chat"}', "'wrapper'"),
])
def test_preference_bad_lines_name_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "ranked.jsonl", [RANKED[0], "", bad])
    with pytest.raises(EvalInputError) as e:
        read_ranked([str(path)])
    assert f"{path}:3" in str(e.value) and reason in str(e.value)
    with pytest.raises(EvalInputError, match="no input matches"):
        read_ranked([str(tmp_path / "nothing*.jsonl")])


def traj(prompt_id, policy, text, **extra):
    return {"prompt_id": prompt_id, "prompt": f"prompt {prompt_id}", "policy": policy,
            "trajectory": text, **extra}


# Overlap with the reference decides each triplet whatever the seeded draw picks:
TRAJECTORIES = [
    # p1: only A has two -> A: chosen 2 > rejected 0 (right); instruction prompt ("sft")
    traj("p1", "A", "a a1 a2", wrapper="sft"), traj("p1", "A", "a a1 a3", wrapper="sft"),
    traj("p1", "B", "b b1", wrapper="sft"),
    # p2: C's two share nothing, D's shares one word with either -> C: wrong
    traj("p2", "C", "c1 c2"), traj("p2", "C", "c3 c4"), traj("p2", "D", "c1 c3 d"),
    # p3: A's two share "a", so does C's -> A: tie
    traj("p3", "A", "a x"), traj("p3", "A", "a y"), traj("p3", "C", "a z"),
    # p4: A and B both have two; nothing is shared across policies -> both right
    traj("p4", "A", "a q"), traj("p4", "A", "a r"), traj("p4", "B", "b s"),
    traj("p4", "B", "b t"),
]
# A: 2.5 / 3, B: 1 / 1, C: 0 / 1; overall 3.5 / 5


def test_discrimination_accuracy_per_reference_policy(tmp_path):
    seen = []

    def score(records):
        seen.extend(records)
        return overlap_score(records)

    path = write_jsonl(tmp_path / "traj.jsonl", TRAJECTORIES)
    report = discrimination_accuracy([str(path)], score)
    got = {n: (a.count, a.correct, a.ties) for n, a in report.policies.items()}
    assert got == {"A": (3, 2.5, 1), "B": (1, 1.0, 0), "C": (1, 0.0, 0)}
    assert (report.overall.count, report.overall.correct) == (5, 3.5)
    assert report.overall.accuracy == 0.7
    assert report.macro_accuracy == pytest.approx((2.5 / 3 + 1 + 0) / 3)
    by_policy = {(o.policy, o.rejected_policy) for o in report.outcomes}
    assert by_policy == {("A", "B"), ("C", "D"), ("A", "C"), ("B", "A")}
    assert report.data.counts() == {"trajectories_read": 13, "trajectories_kept": 13,
                                    "trajectories_used": 13, "triplets_assembled": 5,
                                    "triplets_scored": 5}
    # s+ then s- of each triplet, with the prompt's wrapper (default "pretrain").
    assert len(seen) == 10 and seen[0].where.endswith("(chosen)")
    assert {r.wrapper for r in seen if r.prompt == "prompt p1"} == {"sft"}
    assert {r.wrapper for r in seen if r.prompt != "prompt p1"} == {"pretrain"}
    assert "mean over policies" in report.table()
    assert report.as_dict()["triplets_scored"] == 5


def test_discrimination_keeps_only_the_given_policies_and_caps(tmp_path):
    path = write_jsonl(tmp_path / "traj.jsonl", TRAJECTORIES)
    # C and D left out: p2 has no triplet, p3 has A alone; p1 and p4 are all right.
    report = discrimination_accuracy([str(path)], overlap_score, policies=["A", "B"])
    assert {n: a.count for n, a in report.policies.items()} == {"A": 2, "B": 1}
    assert report.overall.accuracy == 1.0 and report.data.trajectories_kept == 9
    capped = load_policy_triplets([str(path)], seed=5, max_triplets=2)
    again = load_policy_triplets([str(path)], seed=5, max_triplets=2)
    assert len(capped.triplets) == 2 and capped.triplets == again.triplets
    assert capped.triplets_assembled == 5
    with pytest.raises(EvalInputError, match="policies not found.*: Z"):
        load_policy_triplets([str(path)], policies=["A", "Z"])


@pytest.mark.parametrize("bad, reason", [
    ('{"prompt_id": "p9", "prompt": "x", "policy": "A"', "malformed JSON"),
    ('{"prompt_id": "p9", "prompt": "x", "policy": "A", "trajectory": " "}', "non-empty"),
    ('{"prompt_id": "p9", "prompt": "x", "policy": ["A"], "trajectory": "t"}', "'policy'"),
])
def test_discrimination_bad_lines_name_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "traj.jsonl", TRAJECTORIES[:2] + [bad] + TRAJECTORIES[2:])
    with pytest.raises(EvalInputError) as e:
        load_policy_triplets([str(path)])
    assert f"{path}:3" in str(e.value) and reason in str(e.value)


# ---- a real tiny model ----------------------------------------------------------------------

def run(args, nproc=1, timeout=300):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    return subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised tiny RM (seed 7), in process, saved as a checkpoint with its
    preset and tokenizer; plus the ranked and trajectory files."""
    import torch

    from megatron_polar.data.tokenizer import copy_tokenizer
    from megatron_polar.eval.scorer import RewardScorer
    from megatron_polar.model.presets import MODEL_FILE
    from megatron_polar.runtime.checkpoints import save_model_weights

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("eval")
    tok = make_sentencepiece(root)
    scorer = RewardScorer.from_init("tiny", str(tok), seed=7)
    ckpt = save_model_weights(scorer.chunks, root / "ckpt")
    (ckpt / MODEL_FILE).write_text(json.dumps(scorer.preset.as_dict()))
    copy_tokenizer(tok, ckpt / "tokenizer")
    write_jsonl(root / "ranked.jsonl", RANKED)
    write_jsonl(root / "traj.jsonl", TRAJECTORIES)
    return root, tok, ckpt, scorer


def test_scorer_in_process(tiny):
    from megatron_polar.eval.scorer import RewardScorer, ScoreRecord

    root, tok, ckpt, scorer = tiny
    records = [ScoreRecord("what", "the cat sat", "a mat"), ScoreRecord("why", "", "one two"),
               ScoreRecord([{"role": "user", "content": "how"}], "model", "", "pretrain")]
    together = scorer.score(records)
    assert len(set(together)) == 3
    # A scorer holds the weights only: no DDP (whose fp32 gradient buffer is 4 bytes per
    # parameter), no gradients, in eval mode, and it stays so after scoring.
    for chunk in scorer.chunks:
        params = list(chunk.parameters())
        assert params and not hasattr(chunk, "zero_grad_buffer") and not chunk.training
        assert not any(p.requires_grad or hasattr(p, "main_grad") for p in params)
    # Packing does not change a reward; the checkpoint holds the same weights.
    assert [scorer.score([r])[0] for r in records] == pytest.approx(together, abs=1e-5)
    loaded = RewardScorer.from_checkpoint(str(ckpt))
    assert loaded.score(records) == pytest.approx(together, abs=1e-5)
    assert loaded.source.preset.name == "tiny" and scorer.score([]) == []
    other = RewardScorer.from_init("tiny", str(tok), seed=8)
    assert other.score(records) != pytest.approx(together, abs=1e-3)


def test_cli_end_to_end_agrees_with_score(tiny, tmp_path):
    root, tok, ckpt, scorer = tiny
    # The init path in a fresh process: seed 7 gives the weights saved in the fixture.
    out = ok(run(["tools/eval_preference.py", "--init-preset", "tiny", "--seed", "7",
                  "--tokenizer", str(tok), "--ranked", str(root / "ranked.jsonl"),
                  "--trajectories", str(root / "traj.jsonl"),
                  "--output-json", str(tmp_path / "init.json")]))
    assert "mean over categories" in out and "mean over policies" in out
    report = json.loads((tmp_path / "init.json").read_text())
    assert report["model"]["kind"] == "init" and report["model"]["seed"] == 7
    pref, disc = report["preference"], report["discrimination"]
    assert set(pref["categories"]) == {"chat", "code", "math"}
    assert [c["count"] for c in pref["categories"].values()] == [4, 2, 1]
    assert pref["overall"]["count"] == 7 and len(pref["records"]) == 7
    assert pref["overall"]["correct"] == sum(r["credit"] for r in pref["records"])
    assert disc["triplets_scored"] == 5 and set(disc["policies"]) == {"A", "B", "C"}
    assert disc["overall"]["correct"] == sum(t["credit"] for t in disc["triplets"])

    # The same records through `python -m megatron_polar.score` on the saved checkpoint.
    lines = []
    for r in RANKED:
        for k in (1, 2):
            lines.append({"prompt": r["prompt"], "reference": r["responses"][0],
                          "candidate": r["responses"][k], "wrapper": r.get("wrapper", "sft")})
    write_jsonl(tmp_path / "score_in.jsonl", lines)
    scored = [json.loads(x)["reward"] for x in ok(run(
        ["-m", "megatron_polar.score", "--checkpoint", str(ckpt),
         "--input", str(tmp_path / "score_in.jsonl")])).splitlines() if x.startswith("{")]
    cli = [x for r in pref["records"] for x in (r["chosen_reward"], r["rejected_reward"])]
    assert cli == pytest.approx(scored, abs=1e-5, rel=0)
    assert len(set(round(x, 6) for x in scored)) > 7  # the comparison can tell rewards apart

    # The checkpoint at PP=2 under torchrun: rewards broadcast from the last stage to rank 0.
    ok(run(["tools/eval_preference.py", "--checkpoint", str(ckpt), "--ranked",
            str(root / "ranked.jsonl"), "--pipeline-model-parallel-size", "2",
            "--output-json", str(tmp_path / "pp2.json")], nproc=2))
    pp2 = json.loads((tmp_path / "pp2.json").read_text())
    assert pp2["layout"]["pipeline_model_parallel_size"] == 2
    assert [x for r in pp2["preference"]["records"]
            for x in (r["chosen_reward"], r["rejected_reward"])] == pytest.approx(
        scored, abs=1e-5, rel=0)


def test_cli_bad_input_exits_2_naming_the_line(tiny, tmp_path):
    root, tok, ckpt, _ = tiny
    bad = write_jsonl(tmp_path / "bad.jsonl", RANKED[:1] + [
        {"prompt": "p", "responses": ["a", "b"]}])
    proc = run(["tools/eval_preference.py", "--checkpoint", str(ckpt), "--ranked", str(bad)])
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr
    assert "at least 3 responses" in proc.stderr
