"""Generation backends: transformers (any machine) and vLLM (CUDA, imported only when used).

A backend loads one policy and turns a batch of prompts (token ids) into `n` samples each,
as token ids without the EOS and whether generation stopped on EOS. Decoding, truncation and
the output format are the sampler's, so both backends produce the same records.

Determinism, which resumable shards rely on: the transformers backend seeds torch with the
batch's seed right before `generate`; vLLM takes one seed per request, so a prompt's samples
do not depend on which other prompts share its batch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional, Sequence

BACKENDS = ("auto", "transformers", "vllm")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class BackendError(RuntimeError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int


@dataclass(frozen=True)
class Generation:
    ids: list[int]   # generated tokens, EOS and padding removed
    stopped: bool    # True: ended on EOS; False: hit max_new_tokens


def resolve_backend(name: str) -> str:
    """`auto` is vLLM when it is installed and a GPU is visible, else transformers."""
    if name not in BACKENDS:
        raise BackendError(f"--backend must be one of {BACKENDS}, got {name!r}")
    have_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not have_vllm:
        raise BackendError("--backend vllm: vllm is not installed (pip install vllm on a CUDA "
                           "machine), or use --backend transformers")
    if name != "auto":
        return name
    import torch

    return "vllm" if have_vllm and torch.cuda.is_available() else "transformers"


def _eos_ids(path: str, tokenizer) -> set[int]:
    """Every id that ends a turn: chat models often list several in generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except (OSError, ValueError):
        eos = None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if not ids:
        raise BackendError(f"{path}: the tokenizer and generation config name no EOS token")
    return ids


def _until_eos(ids: Sequence[int], eos: set[int]) -> Generation:
    for i, t in enumerate(ids):
        if t in eos:
            return Generation(list(ids[:i]), True)
    return Generation(list(ids), False)


class TransformersBackend:
    name = "transformers"

    def __init__(self, path: str, dtype: str = "auto", device: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            # bf16 halves memory and time on GPUs; CPUs have no fast bf16 matmul everywhere.
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # never trust_remote_code
        self.eos = _eos_ids(path, self.tokenizer)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else min(self.eos))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        # generate() fills unset options from the model's generation_config.json (repetition
        # penalties, min lengths, ...); the paper samples with temperature/top-p/top-k only, so
        # keep nothing of that file but its special ids.
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos), pad_token_id=self.pad_id,
            bos_token_id=self.tokenizer.bos_token_id)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int,
                 request_seeds: Sequence[int]) -> list[list[Generation]]:
        import torch
        from transformers import GenerationConfig

        # Left padding: every prompt ends at the same position, where generation starts.
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        config = GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, max_new_tokens=params.max_new_tokens, num_return_sequences=n,
            eos_token_id=sorted(self.eos), pad_token_id=self.pad_id)
        torch.manual_seed(seed)  # seeds the CUDA generators too
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=mask.to(self.device),
                                      generation_config=config)
        new = out[:, width:].tolist()  # rows: prompt 0 sample 0..n-1, prompt 1, ...
        return [[_until_eos(new[i * n + s], self.eos) for s in range(n)]
                for i in range(len(prompts))]


class VLLMBackend:
    """vLLM's offline `LLM` engine. Not exercised in CI (no GPU there); written against the
    public `LLM` / `SamplingParams` API with one seed per request."""

    name = "vllm"

    def __init__(self, path: str, dtype: str = "auto", seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9):
        try:
            from vllm import LLM
        except ImportError:
            raise BackendError("--backend vllm: vllm is not installed (pip install vllm on a "
                               "CUDA machine), or use --backend transformers") from None
        self.llm = LLM(model=path, tokenizer=path, dtype=dtype, seed=seed,
                       trust_remote_code=False, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization)
        self.tokenizer = self.llm.get_tokenizer()
        self.eos = _eos_ids(path, self.tokenizer)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams, seed: int,
                 request_seeds: Sequence[int]) -> list[list[Generation]]:
        from vllm import SamplingParams as VLLMSamplingParams

        per_request = [VLLMSamplingParams(
            n=n, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # vLLM's "no top-k" is -1
            max_tokens=params.max_new_tokens, seed=s, skip_special_tokens=True)
            for s in request_seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], per_request,
                                    use_tqdm=False)
        results = []
        for out in outputs:  # vLLM returns them in request order
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                g = _until_eos(list(c.token_ids), self.eos)
                # A stop other than EOS (e.g. a stop string of the model's config) also ends it.
                samples.append(Generation(g.ids, g.stopped or c.finish_reason == "stop"))
            results.append(samples)
        return results


def load_backend(name: str, path: str, dtype: str = "auto", seed: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9):
    if dtype not in DTYPES:
        raise BackendError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    name = resolve_backend(name)
    if name == "vllm":
        return VLLMBackend(path, dtype, seed, tensor_parallel_size, gpu_memory_utilization)
    return TransformersBackend(path, dtype)
