#!/usr/bin/env python3
"""Sampling throughput of the transformers backend (tools/sample_trajectories.py) on this machine.

Tiny randomly initialised Llama policies, saved with a word-level tokenizer and loaded through
the backend the sampler uses; each batch of prompts gets `--samples` trajectories of up to
`--max-new-tokens` with the paper's sampling settings. Prints a table and one JSON line.

    python tools/benchmark_sampling.py [--batch-sizes 1 8 32] [--max-new-tokens 128]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (hidden, layers, heads, intermediate, vocabulary)
MODELS = {
    "llama-h128-l4-v1k": (128, 4, 4, 512, 1024),
    "llama-h384-l6-v4k": (384, 6, 6, 1024, 4096),
}


def save_policy(directory: Path, hidden: int, layers: int, heads: int, intermediate: int,
                vocab: int) -> int:
    """A random Llama and a word-level tokenizer of `vocab` entries; returns the parameters."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<pad>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(directory)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def measure(backend, batch: int, samples: int, prompt_tokens: int, max_new_tokens: int,
            repeats: int) -> dict:
    import random

    from megatron_polar.generation.backends import SamplingParams

    vocab = len(backend.tokenizer)
    rng = random.Random(batch)
    prompts = [[rng.randrange(4, vocab) for _ in range(prompt_tokens)] for _ in range(batch)]
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=max_new_tokens)
    backend.generate(prompts, samples, SamplingParams(1.0, 0.9, 50, 4), seed=0,
                     request_seeds=[0] * batch)  # warm-up
    rates, tokens = [], 0
    for r in range(repeats):
        start = time.perf_counter()
        out = backend.generate(prompts, samples, params, seed=r + 1, request_seeds=[0] * batch)
        seconds = time.perf_counter() - start
        # Tokens the sampler keeps (up to EOS), as in its summary; the batch runs on until its
        # longest sequence ends, so early EOS costs time without adding tokens.
        tokens = sum(len(g.ids) for row in out for g in row)
        rates.append(tokens / seconds)
    return {"prompts": batch, "sequences": batch * samples, "new_tokens": tokens,
            "tokens_per_s": statistics.median(rates)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32],
                   help="prompts per generate call")
    p.add_argument("--samples", type=int, default=2, help="trajectories per prompt")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = p.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from megatron_polar.generation.backends import TransformersBackend

    hf_logging.disable_progress_bar()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            params = save_policy(Path(tmp) / name, *MODELS[name])
            backend = TransformersBackend(str(Path(tmp) / name), dtype="float32", device="cpu")
            for batch in args.batch_sizes:
                r = measure(backend, batch, args.samples, args.prompt_tokens,
                            args.max_new_tokens, args.repeats)
                results.append({"model": name, "parameters": params, **r})
                print(f"{name:20s} {params / 1e6:6.2f}M params  {batch:3d} prompts x "
                      f"{args.samples} samples  {r['new_tokens']:6d} tokens  "
                      f"{r['tokens_per_s']:8.1f} tokens/s", flush=True)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
                      "samples": args.samples, "results": results}))


if __name__ == "__main__":
    main()
