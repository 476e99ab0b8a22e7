#!/usr/bin/env python3
"""Throughput of the POLAR reward server (`python -m megatron_polar.serving`) on this machine.

A randomly initialised model of `--model-preset` is served in-process exactly as the CLI serves
it (PyTriton `reward_model` + `/pooling`); `--clients` threads, each with its own NeMo-Aligner
`HTTPCommunicator` (or HTTP connection for /pooling), send `--requests` requests of `--batch`
right-padded rollouts. Reports scored sequences/s, POLAR tokens/s (the tokens the model ran)
and request latency per front end, beside the same requests scored in-process one at a time
(the model's own speed); a few served answers are checked against in-process scoring.

    python tools/benchmark_serving.py [--model-preset tiny] [--clients 4] [--batch 8]
    python tools/benchmark_serving.py --model-preset internlm2_5-1_8b --bf16 --batch 32  # GPU
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(rng, n, vocab):
    return " ".join(rng.choice(vocab) for _ in range(n))


def build(args, tmp: Path):
    """(server, service, rollouts as (tokens, lengths) batches, POLAR strings batches)."""
    import numpy as np

    from megatron_polar.eval.scorer import RewardScorer
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.serving.postprocess import RewardPostprocessor
    from megatron_polar.serving.references import ActorTokenizer, ReferenceTable
    from megatron_polar.serving.rewards import PolarRewardService, RequestLimits
    from megatron_polar.serving.server import RewardServer
    from megatron_polar.serving.triton_models import TritonSettings
    from megatron_polar.testing.tokenizers import WORDS, make_sentencepiece

    tok = args.tokenizer or str(make_sentencepiece(tmp))
    scorer = RewardScorer.from_init(args.model_preset, tok, seed=1,
                                    run=ModelRunConfig(bf16=args.bf16),
                                    micro_batch_tokens=args.micro_batch_tokens)
    rng = random.Random(0)
    refs = [{"text": f"User: {k} {words(rng, args.prompt_words, WORDS)}\nAssistant:",
             "reference": words(rng, args.response_words, WORDS)} for k in range(args.prompts)]
    (tmp / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    actor = ActorTokenizer(tok)
    table = ReferenceTable.from_file(tmp / "refs.jsonl", actor)
    service = PolarRewardService(scorer, table, RewardPostprocessor(), None,
                                 RequestLimits(max_batch_size=max(64, args.batch)))
    settings = TritonSettings(http_port=free_port(), max_batch_size=max(64, args.batch))
    server = RewardServer(service, settings, pooling_port=free_port())

    token_batches, text_batches = [], []
    for _ in range(16):  # a pool of distinct requests, cycled
        rows, texts = [], []
        for _ in range(args.batch):
            entry = rng.choice(refs)
            response = " " + words(rng, args.response_words, WORDS)
            rows.append(actor.prompt_ids(entry["text"]) + actor.text_to_ids(response))
            p = entry["text"]
            texts.append(p + "\n" + entry["reference"] + "<|reward|>" + p + "\n" + response
                         + "[UNUSED_TOKEN_130]")
        width = max(map(len, rows))
        tokens = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        token_batches.append((tokens, np.array([[len(r)] for r in rows], dtype=np.int64)))
        text_batches.append(texts)
    return server, service, token_batches, text_batches


def post(url, texts):
    data = json.dumps({"input": texts}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return [e["data"] for e in json.loads(r.read())["data"]]


def run_frontend(name, args, server, service, token_batches, text_batches):
    import numpy as np
    from nemo_aligner.servers.http_communicator import HTTPCommunicator

    url = f"http://127.0.0.1:{server.pooling_port}/pooling"
    latencies, lock = [], threading.Lock()
    failures = []

    def client(c):
        comm = HTTPCommunicator(init_timeout_s=120)
        comm.add_server_by_name("reward_model", ip="127.0.0.1", port=server.settings.http_port)
        try:
            for k in range(args.requests):
                i = (c * args.requests + k) % len(token_batches)
                t0 = time.perf_counter()
                if name == "triton":
                    tokens, lengths = token_batches[i]
                    got = comm.send_data_to_server("reward_model", {
                        "tokens": tokens, "sequence_lengths": lengths}).result()["rewards"][:, 0]
                else:
                    got = post(url, text_batches[i])
                with lock:
                    latencies.append(time.perf_counter() - t0)
                if k < 2:  # spot checks against in-process scoring
                    want = service.rewards_for_tokens(*token_batches[i]) if name == "triton" \
                        else service.rewards_for_texts(text_batches[i])
                    if not np.allclose(got, want, atol=1e-4):
                        failures.append((c, k))
        finally:
            comm.close()

    before_seq, before_tok = service.sequences_scored, service.tokens_scored
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{name}: answers differ from in-process scoring at {failures[:4]}")
    # Spot checks score again in-process; count the served work only.
    checks = args.clients * min(2, args.requests) * args.batch
    seqs = service.sequences_scored - before_seq - checks
    toks = (service.tokens_scored - before_tok) * seqs / max(seqs + checks, 1)
    lat = sorted(latencies)
    return {"frontend": name, "requests": len(lat), "sequences": seqs, "wall_s": round(wall, 2),
            "sequences_per_s": round(seqs / wall, 1), "tokens_per_s": round(toks / wall),
            "latency_p50_ms": round(1e3 * statistics.median(lat), 1),
            "latency_p95_ms": round(1e3 * lat[int(0.95 * (len(lat) - 1))], 1)}


def run_in_process(args, service, token_batches):
    """The same requests scored in-process, one at a time: the model's own speed, without
    HTTP, Triton or concurrency, for comparison."""
    before_seq, before_tok = service.sequences_scored, service.tokens_scored
    n = max(4, args.requests // 2)
    t0 = time.perf_counter()
    for k in range(n):
        service.rewards_for_tokens(*token_batches[k % len(token_batches)])
    wall = time.perf_counter() - t0
    seqs, toks = service.sequences_scored - before_seq, service.tokens_scored - before_tok
    return {"frontend": "in-process", "requests": n, "sequences": seqs, "wall_s": round(wall, 2),
            "sequences_per_s": round(seqs / wall, 1), "tokens_per_s": round(toks / wall),
            "latency_p50_ms": round(1e3 * wall / n, 1), "latency_p95_ms": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-preset", default="tiny")
    p.add_argument("--tokenizer", default=None, help="default: a small test sentencepiece")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=50, help="per client")
    p.add_argument("--batch", type=int, default=8, help="rollouts per request")
    p.add_argument("--prompts", type=int, default=256, help="reference-file entries")
    p.add_argument("--prompt-words", type=int, default=20)
    p.add_argument("--response-words", type=int, default=60)
    p.add_argument("--frontends", default="triton,pooling")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(k, None)

    import torch

    with tempfile.TemporaryDirectory(prefix="polar_bench_serving_") as tmp:
        server, service, token_batches, text_batches = build(args, Path(tmp))
        with server:
            # Warm-up: first calls build caches and Triton connections.
            service.rewards_for_tokens(*token_batches[0])
            rows = [run_in_process(args, service, token_batches)]
            rows += [run_frontend(name, args, server, service, token_batches, text_batches)
                     for name in args.frontends.split(",")]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model_preset": args.model_preset, "device": device, "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "clients": args.clients,
              "batch": args.batch, "results": rows}
    print(f"\nPOLAR reward server, preset {args.model_preset} on {device}, {args.clients} "
          f"clients x {args.requests} requests x {args.batch} rollouts\n")
    print("| front end | requests | seq/s | POLAR tok/s | p50 ms | p95 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['frontend']} | {r['requests']} | {r['sequences_per_s']} | "
              f"{r['tokens_per_s']} | {r['latency_p50_ms']} | {r['latency_p95_ms']} |")
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
