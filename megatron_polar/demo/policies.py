"""The demo's policy pool: tiny Llama causal LMs trained for a minute or two on the corpus.

As in the paper's pool, most policies are intermediate checkpoints of one run (on prose), and
other runs train on other mixes (code; prose and code); one run gives several policies because
a checkpoint a few hundred steps further writes visibly better text. The models are plain
`transformers` Llama models saved with `save_pretrained`, so the sampler (and vLLM) load them
as any HF policy.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class PolicyShape:
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 256
    max_position_embeddings: int = 512


@dataclass(frozen=True)
class PolicyRun:
    """One training run; `save_at` steps become policies named `{name}-{step}`."""

    name: str
    mix: dict  # corpus name -> share of each batch
    save_at: tuple[int, ...]
    seed: int = 0
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 128
    shape: PolicyShape = field(default_factory=PolicyShape)

    def policy_names(self) -> list[str]:
        return [f"{self.name}-{step}" for step in self.save_at]


def _token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    ids: list[int] = []
    for batch_start in range(0, len(texts), 512):
        for row in tokenizer(texts[batch_start:batch_start + 512],
                             add_special_tokens=False)["input_ids"]:
            ids += [tokenizer.bos_token_id, *row, tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def train_policy_run(run: PolicyRun, corpora: dict[str, list[str]], tokenizer_dir: Path,
                     out_dir: Path, progress: Optional[Callable[[int], None]] = None) -> list[Path]:
    """Train `run` and save its checkpoints as HF directories `out_dir/{name}-{step}`, each
    written to a temporary name and renamed when complete. Returns the directories."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stage has its own bar
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    streams = {name: _token_stream(corpora[name], tokenizer) for name in run.mix}
    rows = {name: max(1, round(share * run.batch_size)) for name, share in run.mix.items()}
    s = run.shape
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden_size, intermediate_size=s.ffn_hidden_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads, max_position_embeddings=s.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        # InternLM2's norm epsilon and the presets' RoPE base, so that a run in the reward
        # model's shape converts to it exactly (base_model.py).
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(run.seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(run.seed)
    warmup = max(1, run.save_at[-1] // 20)
    saved = []
    for step in range(1, run.save_at[-1] + 1):
        for group in optimizer.param_groups:
            group["lr"] = run.lr * min(1.0, step / warmup)
        batch = []
        for name, n in rows.items():
            stream = streams[name]
            starts = torch.randint(0, len(stream) - run.seq_len, (n,), generator=generator)
            batch += [stream[i:i + run.seq_len] for i in starts.tolist()]
        x = torch.stack(batch)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(1)
        if step in run.save_at:
            final = out_dir / f"{run.name}-{step}"
            tmp = out_dir / f".{run.name}-{step}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            saved.append(final)
    return saved
