"""The reward and critic server against real clients on loopback: NeMo-Aligner's own
`HTTPCommunicator` (PyTriton) and POLAR's `/pooling` request format, with a tiny model on CPU.

One server (combined RM + critic, the shape NeMo-Aligner's PPO uses) is started once for the
module; rewards are checked against offline scoring with `python -m megatron_polar.score`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import signal
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from megatron_polar.testing.tokenizers import make_sentencepiece

ROOT = Path(__file__).resolve().parents[1]

# Prompt texts as the actor sees them (a chat template around the POLAR prompt) and the
# references; "what is one" is a prefix of "what is one plus two": the longest must win.
REFS = [
    {"text": "User: what is one\nAssistant:", "prompt": "what is one",
     "reference": "one is a number"},
    {"text": "User: what is one plus two\nAssistant:", "prompt": "what is one plus two",
     "reference": "three"},
    {"text": "User: tell a story\nAssistant:", "prompt": [{"role": "user", "content": "tell"},
                                                          {"role": "user", "content": "a story"}],
     "reference": "the cat sat on a mat", "wrapper": "sft"},
]
RESPONSES = [" one is one", " three", " the cat sat on a mat while the model", " data",
             " apple river", ""]


def free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def served(tmp_path_factory, ctx1):
    import torch

    from megatron_polar.data.tokenizer import copy_tokenizer
    from megatron_polar.eval.scorer import RewardScorer
    from megatron_polar.model.presets import MODEL_FILE
    from megatron_polar.serving.__main__ import build_parser
    from megatron_polar.serving.server import build_server
    from megatron_polar.runtime.checkpoints import save_model_weights

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("serving")
    tok = make_sentencepiece(root)
    init = RewardScorer.from_init("tiny", str(tok), seed=11)
    ckpt = save_model_weights(init.chunks, root / "ckpt")
    (ckpt / MODEL_FILE).write_text(json.dumps(init.preset.as_dict()))
    copy_tokenizer(tok, ckpt / "tokenizer")
    refs = root / "references.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in REFS))
    triton_port, pooling_port = free_ports(2)
    args = build_parser().parse_args([
        "--checkpoint", str(ckpt), "--references", str(refs), "--port", str(triton_port),
        "--pooling-port", str(pooling_port), "--critic", "--critic-save", str(root / "critic"),
        "--critic-global-batch-size", "4", "--critic-micro-batch-size", "2",
        "--critic-lr", "1e-4", "--max-batch-size", "16", "--max-body-bytes", "100000"])
    server = build_server(args)
    with server:
        yield dict(root=root, tok=tok, ckpt=ckpt, server=server, triton_port=triton_port,
                   pooling=f"http://127.0.0.1:{pooling_port}")


@pytest.fixture(scope="module")
def communicator(served):
    from nemo_aligner.servers.http_communicator import HTTPCommunicator

    comm = HTTPCommunicator(init_timeout_s=120)
    for name in ("reward_model", "critic_infer", "critic_train", "critic_save"):
        comm.add_server_by_name(name, ip="127.0.0.1", port=served["triton_port"])
    yield comm
    comm.close()


def rollouts(tok_path, pairs):
    """Right-padded token batch + lengths [B, 1], as NeMo-Aligner's actor sends them."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_path))
    rows = [sp.encode_as_ids(REFS[i]["text"]) + sp.encode_as_ids(resp) for i, resp in pairs]
    width = max(map(len, rows)) + 3  # extra padding, as a rollout batch has
    tokens = np.zeros((len(rows), width), dtype=np.int64)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    return tokens, np.array([[len(r)] for r in rows], dtype=np.int64)


def offline_rewards(served, pairs):
    """`python -m megatron_polar.score` on (prompt, reference, response) records."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(served["tok"]))
    path = served["root"] / f"offline_{len(pairs)}.jsonl"
    path.write_text("".join(json.dumps({
        "prompt": REFS[i]["prompt"], "reference": REFS[i]["reference"],
        "candidate": sp.decode_ids(sp.encode_as_ids(resp)), "wrapper": "sft"}) + "\n"
        for i, resp in pairs))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "megatron_polar.score", "--checkpoint",
                           str(served["ckpt"]), "--input", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["reward"] for line in proc.stdout.splitlines()]


def post(url, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PAIRS = [(0, RESPONSES[0]), (1, RESPONSES[1]), (2, RESPONSES[2]), (1, RESPONSES[3]),
         (0, RESPONSES[5])]


def test_nemo_aligner_client_rewards_equal_offline_scoring(served, communicator):
    tokens, lengths = rollouts(served["tok"], PAIRS)
    out = communicator.send_data_to_server("reward_model", {
        "tokens": tokens, "sequence_lengths": lengths}).result()
    rewards = out["rewards"]
    assert rewards.shape == (len(PAIRS), 1) and rewards.dtype == np.float32
    expected = offline_rewards(served, PAIRS)
    np.testing.assert_allclose(rewards[:, 0], expected, atol=1e-5)
    assert len(set(np.round(rewards[:, 0], 5))) == len(PAIRS)

    # The same sequences as POLAR strings on /pooling, in POLAR's request format.
    status, body = post(served["pooling"] + "/pooling", {
        "model": "polar", "input": [_polar_string(served, i, r) for i, r in PAIRS]})
    assert status == 200, body
    assert [d["index"] for d in body["data"]] == list(range(len(PAIRS)))
    # Parsed as POLAR's client parses an lmdeploy answer (server_type "lmdeploy") ...
    np.testing.assert_allclose([e["data"] for e in body["data"]], expected, atol=1e-5)
    # ... and as it parses sglang's (its default server_type) from /classify.
    status, body = post(served["pooling"] + "/classify", {
        "model": "POLAR-7B", "text": [_polar_string(served, i, r) for i, r in PAIRS]})
    assert status == 200, body
    np.testing.assert_allclose([e["embedding"][0] for e in body], expected, atol=1e-5)


def _polar_string(served, i, resp):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(served["tok"]))
    cand = sp.decode_ids(sp.encode_as_ids(resp))
    p = REFS[i]["prompt"]
    p = "\n".join(m["content"] for m in p) if isinstance(p, list) else p
    ref = REFS[i]["reference"]
    # As POLAR's RewardModelClient._encode ends it: the reward token written as text.
    return (p + "\n" + ref + "<|reward|>" + p + ("\n" if cand else "") + cand
            + "[UNUSED_TOKEN_130]")


def test_critic_infer_train_save(served, communicator):
    from megatron_polar.runtime.checkpoints import load_model_weights

    tokens, lengths = rollouts(served["tok"], PAIRS[:4])
    out = communicator.send_data_to_server("critic_infer", {
        "tokens": tokens, "sequence_lengths": lengths}).result()
    assert out["rewards"].shape == (4, 1) and out["values"].shape == tokens.shape
    assert out["values"].dtype == np.float32
    for row, n in zip(out["values"], lengths[:, 0]):  # nothing past a sequence's end
        assert np.all(row[n:] == 0) and np.all(row[:n] != 0)
    reward_only = communicator.send_data_to_server("reward_model", {
        "tokens": tokens, "sequence_lengths": lengths}).result()["rewards"]
    np.testing.assert_allclose(out["rewards"], reward_only, atol=1e-6)

    # A fixed batch, as the actor sends it (one sample, no batching): the loss must fall.
    rng = np.random.default_rng(0)
    mask = (np.arange(tokens.shape[1] - 1)[None, :] < lengths - 1).astype(np.float32)
    prev = out["values"][:, :-1].copy()
    # Targets within the clip range (0.2) of the old values, so the clipped loss can reach 0.
    returns = (prev + 0.15 * np.sign(rng.normal(size=mask.shape))).astype(np.float32) * mask
    batch = {"tokens": tokens, "returns": returns, "prev_values": prev, "mask": mask}
    losses = [float(communicator.send_data_to_server("critic_train", batch, batching=False)
                    .result()["loss_mean"][0]) for _ in range(8)]
    assert losses[-1] < 0.85 * losses[0] and losses[-1] == min(losses), losses
    trained = communicator.send_data_to_server("critic_infer", {
        "tokens": tokens, "sequence_lengths": lengths}).result()
    assert not np.allclose(trained["values"], out["values"])  # the value model moved ...
    np.testing.assert_allclose(trained["rewards"], out["rewards"], atol=1e-6)  # ... the RM not

    status = communicator.send_data_to_server("critic_save", {"dummy_var": np.array([0])},
                                              batching=False).result()["status"]
    assert status.tolist() == [0]
    critic = served["server"].critic
    saved = Path(critic.config.save_dir)
    assert (saved / "latest_checkpointed_iteration.txt").read_text().strip() == str(critic.steps)
    # The checkpoint loads back into the value model and gives the served values.
    before = critic.values(tokens, lengths[:, 0])
    with torch_no_grad():
        for p in critic.core.parameters():
            p.add_(1.0)
    assert not np.allclose(critic.values(tokens, lengths[:, 0]), before)
    load_model_weights(critic.chunks, saved)
    np.testing.assert_allclose(critic.values(tokens, lengths[:, 0]), before, atol=1e-6)


def torch_no_grad():
    import torch

    return torch.no_grad()


def triton_error(communicator, data, model="reward_model"):
    from pytriton.client.exceptions import PyTritonClientError

    with pytest.raises(PyTritonClientError) as e:
        communicator.send_data_to_server(model, data).result()
    return str(e.value)


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served, communicator):
    tokens, lengths = rollouts(served["tok"], PAIRS[:2])
    good = {"tokens": tokens, "sequence_lengths": lengths}
    expected = communicator.send_data_to_server("reward_model", good).result()["rewards"]

    assert "INT64" in triton_error(communicator, dict(good, tokens=tokens.astype(np.int32)))
    assert "batch size" in triton_error(communicator, dict(good, tokens=tokens[0]))
    msg = triton_error(communicator, dict(good, sequence_lengths=lengths + 10))
    assert "batch index 0" in msg and "outside" in msg
    unknown = tokens.copy()
    unknown[1, :3] = [7, 7, 7]
    msg = triton_error(communicator, dict(good, tokens=unknown))
    assert "batch index 1" in msg and "unknown prompt" in msg
    big = np.zeros((17, 4), dtype=np.int64)  # over --max-batch-size 16
    assert "batch" in triton_error(communicator, {"tokens": big, "sequence_lengths":
                                                  np.ones((17, 1), dtype=np.int64)})
    empty = triton_error(communicator, {"tokens": np.zeros((0, 4), dtype=np.int64),
                                        "sequence_lengths": np.zeros((0, 1), dtype=np.int64)})
    assert empty

    pooling = served["pooling"] + "/pooling"
    status, body = post(pooling, None, raw=b"{not json")
    assert status == 400 and "not JSON" in body["message"]
    status, body = post(pooling, {"input": ["no separator here"]})
    assert status == 400 and "input 0" in body["message"]
    status, body = post(pooling, {"input": []})
    assert status == 400
    status, body = post(pooling, {"input": ["x" * 200_000]})  # over --max-body-bytes
    assert status == 413 and "limit" in body["message"]

    # Still serving, with the same answers.
    again = communicator.send_data_to_server("reward_model", good).result()["rewards"]
    np.testing.assert_array_equal(again, expected)
    status, body = post(pooling, {"input": [_polar_string(served, 0, RESPONSES[0])]})
    assert status == 200


def test_load_8_clients_x_200_requests_no_error_no_lost_or_reordered_result(served):
    """Each client sends 200 requests of 1-3 rollouts, half to PyTriton, half to /pooling;
    every reward must be the one this sequence gets alone."""
    from nemo_aligner.servers.http_communicator import HTTPCommunicator

    all_pairs = [(i, r) for i in range(len(REFS)) for r in RESPONSES]
    tokens, lengths = rollouts(served["tok"], all_pairs)
    service = served["server"].service
    truth = np.concatenate([service.rewards_for_tokens(tokens[i:i + 8], lengths[i:i + 8])
                            for i in range(0, len(all_pairs), 8)])

    def client(seed):
        rng = np.random.default_rng(seed)
        comm = HTTPCommunicator(init_timeout_s=60)
        comm.add_server_by_name("reward_model", ip="127.0.0.1", port=served["triton_port"])
        errors = 0
        try:
            for k in range(200):
                pick = rng.choice(len(all_pairs), size=int(rng.integers(1, 4)))
                if k % 2:
                    got = comm.send_data_to_server("reward_model", {
                        "tokens": tokens[pick], "sequence_lengths": lengths[pick]}
                    ).result()["rewards"][:, 0]
                else:
                    status, body = post(served["pooling"] + "/pooling", {"input": [
                        _polar_string(served, *all_pairs[j]) for j in pick]})
                    assert status == 200, body
                    got = np.array([d["data"] for d in body["data"]], dtype=np.float32)
                errors += not np.allclose(got, truth[pick], atol=1e-5)
        finally:
            comm.close()
        return errors

    before = service.sequences_scored
    with ThreadPoolExecutor(8) as pool:
        mismatches = list(pool.map(client, range(8)))
    assert mismatches == [0] * 8
    assert service.sequences_scored - before >= 1600


def test_reference_table_longest_prompt_wins_and_conflicts_are_errors(tmp_path):
    from megatron_polar.data.encoding import RecordError
    from megatron_polar.serving.references import ActorTokenizer, ReferenceTable, UnknownPrompt

    tok = make_sentencepiece(tmp_path)
    actor = ActorTokenizer(tok)
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in REFS + [REFS[0]]))  # exact repeat: ok
    table = ReferenceTable.from_file(refs, actor)
    assert len(table) == 3
    short, long_ = (actor.prompt_ids(REFS[k]["text"]) for k in (0, 1))
    entry, n = table.match(long_ + actor.text_to_ids(" three"))
    assert entry.reference == "three" and n == len(long_)
    entry, n = table.match(short + actor.text_to_ids(" plus"))
    assert entry.reference == "one is a number" and n == len(short)
    with pytest.raises(UnknownPrompt):
        table.match(actor.text_to_ids("apple river"))
    # EOS ends a rollout: it is cut before the response is decoded.
    three = actor.text_to_ids(" three")
    assert 2 in actor.eos_ids and 2 not in three
    assert actor.response_text(three + [2, 2]) == actor.response_text(three)
    assert "three" in actor.response_text(three)

    refs.write_text(json.dumps(REFS[0]) + "\n" + json.dumps(dict(REFS[0], reference="x")) + "\n")
    with pytest.raises(RecordError, match=r"refs.jsonl:2: .*repeats .*refs.jsonl:1"):
        ReferenceTable.from_file(refs, actor)
    refs.write_text(json.dumps({"text": "a", "reference": 3}) + "\n")
    with pytest.raises(RecordError, match=r"refs.jsonl:1: field 'reference'"):
        ReferenceTable.from_file(refs, actor)


def test_actor_tokenizer_from_an_hf_directory_takes_its_declared_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_polar.serving.references import ActorTokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_end|>", "</s>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    actor = ActorTokenizer(tmp_path)
    assert actor.eos_ids == {1} and actor.text_to_ids("hello world") == [3, 4]
    assert actor.response_text([3, 4, 1]) == actor.response_text([3, 4]) == "hello world"
    assert ActorTokenizer(tmp_path, eos_ids=[2]).eos_ids == {2}


def test_reward_postprocessing():
    from megatron_polar.serving.postprocess import PostprocessConfig, RewardPostprocessor

    raw = np.array([1.0, 3.0, -2.0, 10.0])
    assert np.array_equal(RewardPostprocessor()(raw), raw.astype(np.float32))  # as released
    fixed = RewardPostprocessor(PostprocessConfig("fixed", mean=1.0, std=2.0, clip=3.0))
    np.testing.assert_allclose(fixed(raw), [0.0, 1.0, -1.5, 3.0])
    running = RewardPostprocessor(PostprocessConfig("running"))
    first = running(raw[:2])  # normalised by its own statistics
    np.testing.assert_allclose(first, [-1.0, 1.0], atol=1e-6)
    running(raw[2:])
    assert running.count == 4
    assert running.running_mean == pytest.approx(raw.mean())
    assert running.running_std == pytest.approx(raw.std())
    with pytest.raises(ValueError, match="reward-std"):
        PostprocessConfig("fixed", std=0.0)


def test_unknown_prompt_fallback_reward(served):
    from megatron_polar.serving.rewards import PolarRewardService

    base = served["server"].service
    service = PolarRewardService(base.scorer, base.references, unknown_prompt_reward=-7.5)
    tokens, lengths = rollouts(served["tok"], PAIRS[:3])
    tokens[1, :3] = [7, 7, 7]
    got = service.rewards_for_tokens(tokens, lengths)
    assert got[1] == -7.5
    np.testing.assert_allclose(got[[0, 2]], base.rewards_for_tokens(
        tokens[[0, 2]], lengths[[0, 2]]), atol=1e-6)


def test_cli_tp2_under_torchrun_serves_on_localhost_and_stops_on_sigterm(served, communicator,
                                                                       tmp_path):
    """`torchrun -m megatron_polar.serving --tensor-model-parallel-size 2`: rank 0 serves, rank 1
    follows; rewards equal the one-process server's, the critic trains, SIGTERM to rank 0 ends
    both."""
    from nemo_aligner.servers.http_communicator import HTTPCommunicator

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    bad = subprocess.run([sys.executable, "-m", "megatron_polar.serving", "--checkpoint",
                          str(served["ckpt"]), "--references", str(tmp_path / "missing.jsonl")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr

    triton_port, pooling_port = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "megatron_polar.serving", "--checkpoint", str(served["ckpt"]),
         "--tensor-model-parallel-size", "2", "--references",
         str(served["root"] / "references.jsonl"), "--critic", "--port", str(triton_port),
         "--pooling-port", str(pooling_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "log").open("w"),
        text=True)
    comm = None
    try:
        ready = None
        for line in proc.stdout:
            if line.startswith('{"ready"'):
                ready = json.loads(line)["ready"]
                break
        assert ready and ready["host"] == "127.0.0.1" and ready["pooling_port"] == pooling_port
        comm = HTTPCommunicator(init_timeout_s=120)
        for name in ("reward_model", "critic_infer", "critic_train"):
            comm.add_server_by_name(name, ip="127.0.0.1", port=triton_port)
        tokens, lengths = rollouts(served["tok"], PAIRS)
        data = {"tokens": tokens, "sequence_lengths": lengths}
        expected = communicator.send_data_to_server("reward_model", data).result()["rewards"]
        got = comm.send_data_to_server("reward_model", data).result()["rewards"]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        out = comm.send_data_to_server("critic_infer", data).result()
        np.testing.assert_allclose(out["rewards"], expected, atol=1e-5)
        assert out["values"].shape == tokens.shape
        mask = (np.arange(tokens.shape[1] - 1)[None, :] < lengths - 1).astype(np.float32)
        loss = comm.send_data_to_server("critic_train", {
            "tokens": tokens, "returns": mask, "prev_values": out["values"][:, :-1],
            "mask": mask}, batching=False).result()["loss_mean"]
        assert np.isfinite(loss).all()
        status, body = post(f"http://127.0.0.1:{pooling_port}/pooling",
                            {"input": _polar_string(served, 2, RESPONSES[2])})
        assert status == 200
        single = served["server"].service.rewards_for_texts([_polar_string(served, 2,
                                                                            RESPONSES[2])])
        assert body["data"][0]["data"] == pytest.approx(float(single[0]), abs=1e-5)
    finally:
        if comm is not None:
            comm.close()
        # SIGTERM to rank 0 (torchrun itself exits 1 on a signal): it stops serving and
        # releases rank 1; both exit 0, and so does torchrun.
        os.kill(ready["pid"] if ready else proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, (tmp_path / "log").read_text()[-3000:]


def test_token_path_truncates_as_offline_scoring(served):
    """An over-long rollout follows POLAR's truncation rules, exactly as offline scoring does."""
    import copy

    from megatron_polar.data.encoding import EncodingConfig, TripletEncoder
    from megatron_polar.eval.scorer import ScoreRecord
    from megatron_polar.serving.rewards import PolarRewardService

    base = served["server"].service
    scorer = copy.copy(base.scorer)
    scorer.encoder = TripletEncoder(base.scorer.encoder.tok, EncodingConfig(48, 12))
    service = PolarRewardService(scorer, base.references)
    long_response = " the cat sat on a mat while policy models write answers about math" * 3
    tokens, lengths = rollouts(served["tok"], [(1, long_response), (2, RESPONSES[1])])
    got = service.rewards_for_tokens(tokens, lengths)
    actor = base.references.tokenizer
    records = [ScoreRecord(REFS[i]["prompt"], REFS[i]["reference"],
                           actor.response_text(tokens[k, len(actor.prompt_ids(REFS[i]["text"])):
                                                      lengths[k, 0]]))
               for k, i in enumerate((1, 2))]
    ids = [scorer.encode(r) for r in records]
    assert max(map(len, ids)) <= 48 and len(ids[0]) < lengths[0, 0]  # it was cut
    np.testing.assert_allclose(got, scorer.score(records), atol=1e-6)
