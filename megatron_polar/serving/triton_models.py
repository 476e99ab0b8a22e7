"""The PyTriton models NeMo-Aligner's PPO actor calls, bound to our services.

Names, tensors and batching follow NeMo-Aligner 0.7.0's own servers (`serve_reward_model.py`,
`serve_ppo_critic.py`), so an actor config needs no change beyond the address:

| model          | inputs                                              | outputs                 |
|----------------|-----------------------------------------------------|-------------------------|
| `reward_model` | tokens int64 [B, S], sequence_lengths int64 [B, 1], | rewards float32 [B, 1]  |
|                | sentences bytes [B, 1] (optional)                   |                         |
| `critic_infer` | as `reward_model`                                   | rewards [B, 1],         |
|                |                                                     | values float32 [B, S]   |
| `critic_train` | tokens [B, S], returns / prev_values / mask [B, S-1] | loss_mean float32 [1]  |
|                | (one sample: no batching, as NeMo-Aligner sends it) |                         |
| `critic_save`  | dummy_var int64 [1]                                 | status int64 [1]        |

The inference models use Triton's dynamic batcher. PyTriton fails a merged batch as a whole, so
a bad request that the batcher merged with good ones fails those too (its message names the
offending batch index); every request is checked before any model work.

Triton's Python stub process must load this interpreter's libpython, not the system's, or it
fails with "'_thread.RLock' object has no attribute '_recursion_count'" on Debian:
`prefer_own_libpython` puts the interpreter's LIBDIR first on LD_LIBRARY_PATH before Triton
starts (the stub inherits the environment).
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_polar.config.flags import option
from megatron_polar.serving.rewards import RequestError


@dataclass(frozen=True)
class TritonSettings:
    host: str = option(
        "127.0.0.1",
        help="address to bind (default localhost; 0.0.0.0 for actors on other nodes)")
    http_port: int = option(5555, flag="--port", help="PyTriton HTTP port (NeMo-Aligner)")
    # gRPC is off by default: NeMo-Aligner's client speaks HTTP
    grpc_port: Optional[int] = option(None, help="Triton gRPC port (default off)")
    metrics_port: Optional[int] = option(None, help="Triton metrics (default off)")
    reward_model_name: str = option(
        "reward_model", flag="--model-name",
        help="PyTriton model name of the reward (NeMo-Aligner's reward_model.name)")
    max_batch_size: int = option(
        64, help="sequences per request and per dynamically batched execution")
    max_queue_delay_microseconds: int = option(
        2000, flag="--max-queue-delay-us", help="Triton dynamic batcher's wait for more requests")


def prefer_own_libpython() -> None:
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if libdir and (not paths or paths[0] != libdir):
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + [p for p in paths if p != libdir])


def _client_error(e: Exception) -> Exception:
    # PyTriton sends the exception text back to the client; a RequestError is the client's
    # fault and keeps its message, anything else is reported as a server error.
    if isinstance(e, RequestError):
        return e
    return RuntimeError(f"server error: {type(e).__name__}: {e}")


def _tokens_and_lengths(inputs: dict, tokenize_sentences) -> tuple[np.ndarray, np.ndarray]:
    if "sentences" in inputs and inputs["sentences"] is not None:
        return tokenize_sentences(inputs["sentences"])
    if "tokens" not in inputs or "sequence_lengths" not in inputs:
        raise RequestError("send 'tokens' and 'sequence_lengths' (or 'sentences')")
    return inputs["tokens"], inputs["sequence_lengths"]


def sentences_to_tokens(actor_tokenizer, sentences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NeMo-Aligner's optional `sentences` input: full rollouts as UTF-8 bytes, tokenized with
    the actor's tokenizer and right-padded, so that they take the token path."""
    texts = [s.decode("utf-8") if isinstance(s, bytes) else str(s)
             for s in np.asarray(sentences).reshape(len(sentences), -1)[:, 0]]
    ids = [actor_tokenizer.text_to_ids(t) for t in texts]
    width = max(1, max(map(len, ids)))
    tokens = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        tokens[i, :len(row)] = row
    return tokens, np.array([[len(r)] for r in ids], dtype=np.int64)


def bind_reward_model(triton, service, settings: TritonSettings, model_name: Optional[str] = None,
                      values_fn=None) -> None:
    """Bind `service` (a PolarRewardService) as `model_name` (default the reward model's name).
    With `values_fn(tokens, lengths) -> [B, S] float32` the model also returns per-token
    `values` (the critic's `critic_infer`)."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    def tokenize(sentences):
        if service.references is None:
            raise RequestError("'sentences' need the actor tokenizer (--references)")
        return sentences_to_tokens(service.references.tokenizer, sentences)

    @batch
    def infer(**inputs):
        try:
            tokens, lengths = _tokens_and_lengths(inputs, tokenize)
            tokens, lengths = service.check_token_batch(tokens, lengths)
            out = {"rewards": service.rewards_for_tokens(tokens, lengths).reshape(-1, 1)}
            if values_fn is not None:
                out["values"] = values_fn(tokens, lengths).astype(np.float32)
            return out
        except Exception as e:
            raise _client_error(e) from None

    outputs = [Tensor(name="rewards", dtype=np.float32, shape=(1,))]
    if values_fn is not None:
        outputs.append(Tensor(name="values", dtype=np.float32, shape=(-1,)))
    triton.bind(
        model_name=model_name or settings.reward_model_name,
        infer_func=infer,
        inputs=[Tensor(name="sentences", dtype=bytes, shape=(1,), optional=True),
                Tensor(name="tokens", dtype=np.int64, shape=(-1,), optional=True),
                Tensor(name="sequence_lengths", dtype=np.int64, shape=(1,), optional=True)],
        outputs=outputs,
        config=ModelConfig(max_batch_size=settings.max_batch_size, batcher=DynamicBatcher(
            max_queue_delay_microseconds=settings.max_queue_delay_microseconds)),
        strict=True,
    )


def bind_critic(triton, service, critic, settings: TritonSettings) -> None:
    """`critic_infer`, `critic_train` and `critic_save` (NeMo-Aligner's combined RM + critic
    server); `critic` is a `CriticService`."""
    from pytriton.decorators import sample
    from pytriton.model_config import ModelConfig, Tensor

    bind_reward_model(triton, service, settings, model_name="critic_infer",
                      values_fn=critic.values)

    @sample
    def train(tokens, returns, prev_values, mask):
        try:
            return {"loss_mean": np.array([critic.train(tokens, returns, prev_values, mask)],
                                          dtype=np.float32)}
        except Exception as e:
            raise _client_error(e) from None

    @sample
    def save(**_):
        try:
            critic.save()
            return {"status": np.array([0], dtype=np.int64)}
        except Exception as e:
            raise _client_error(e) from None

    unbatched = ModelConfig(batching=False, max_batch_size=0, batcher=None)
    triton.bind(
        model_name="critic_train", infer_func=train,
        inputs=[Tensor(name="tokens", dtype=np.int64, shape=(-1, -1)),
                Tensor(name="returns", dtype=np.float32, shape=(-1, -1)),
                Tensor(name="prev_values", dtype=np.float32, shape=(-1, -1)),
                Tensor(name="mask", dtype=np.float32, shape=(-1, -1))],
        outputs=[Tensor(name="loss_mean", dtype=np.float32, shape=(1,))],
        config=unbatched, strict=True)
    triton.bind(
        model_name="critic_save", infer_func=save,
        inputs=[Tensor(name="dummy_var", dtype=np.int64, shape=(1,))],
        outputs=[Tensor(name="status", dtype=np.int64, shape=(1,))],
        config=unbatched, strict=True)


def triton_config(settings: TritonSettings):
    from pytriton.triton import TritonConfig

    return TritonConfig(
        http_address=settings.host, http_port=settings.http_port,
        allow_grpc=settings.grpc_port is not None, grpc_address=settings.host,
        grpc_port=settings.grpc_port,
        allow_metrics=settings.metrics_port is not None, metrics_port=settings.metrics_port,
        metrics_address=settings.host if settings.metrics_port is not None else None)
