"""Load a POLAR reward model once and score many (prompt, reference, candidate) records.

Sources: a megatron checkpoint (run dir, iter_N or weights checkpoint), an HF
`InternLM2ForRewardModel` directory (imported on the fly into a temporary checkpoint, so that
scoring an export also checks the conversion both ways), or a model freshly initialised from a
preset and a seed (the "before training" chance baseline). Sequences are encoded exactly as
training encodes them (`TripletEncoder.encode_sequence`) and run through megatron-core in packed
micro-batches at any TP/PP, in one process or under torchrun.

    scorer = RewardScorer.from_checkpoint("runs/polar7b")
    rewards = scorer.score([ScoreRecord(prompt, reference, candidate)])

Rewards come back on every rank: the last pipeline stage computes them and broadcasts them to
the other stages, so any rank can use them. Data-parallel replicas each score every record.

`python -m megatron_polar.score` and `tools/eval_preference.py` both load through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from megatron_polar.data.encoding import EncodingConfig, RecordError, TripletEncoder

if TYPE_CHECKING:  # torch and megatron-core load only once a model is built
    from megatron_polar.model.config import ModelRunConfig
    from megatron_polar.model.presets import ModelPreset
    from megatron_polar.runtime.parallel import ParallelContext

# Sequences per pass through the schedule: bounds the packed tensors held at once on a large
# evaluation set; far above what a typical scoring file holds, so that one stays one pass.
SEQUENCES_PER_PASS = 4096


class ScorerError(RuntimeError):
    """A model that cannot be loaded; the message says why (the CLIs exit with status 2)."""


@dataclass(frozen=True)
class ScoreRecord:
    """One sequence to score: r(prompt, reference, candidate). Fields are strings or chat
    message lists, as in training data; `where` (e.g. "file.jsonl:12") names the record in
    errors."""

    prompt: Any
    reference: Any
    candidate: Any
    wrapper: str = "sft"
    where: Optional[str] = None


@dataclass(frozen=True)
class ModelSource:
    """Where the weights, the architecture and the tokenizer come from, resolved."""

    kind: str  # "checkpoint", "hf" or "init"
    path: Optional[str]  # as given: checkpoint, HF directory, or None for "init"
    checkpoint: Optional[Path]  # the dist checkpoint to load; None: freshly initialised
    preset: "ModelPreset"
    tokenizer: Path

    def encoder(self, encoding: EncodingConfig = EncodingConfig()) -> TripletEncoder:
        from megatron_polar.data.tokenizer import PolarTokenizer

        return TripletEncoder(PolarTokenizer(self.tokenizer), encoding)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path,
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "preset": self.preset.name, "tokenizer": str(self.tokenizer)}


@contextlib.contextmanager
def open_source(checkpoint: Optional[str] = None, hf: Optional[str] = None,
                init_preset: Optional[str] = None, tokenizer: Optional[str] = None,
                model_preset: Optional[str] = None) -> Iterator[ModelSource]:
    """Resolve exactly one of `checkpoint`, `hf`, `init_preset`; ScorerError says what is
    wrong with it. An HF directory is imported into a temporary checkpoint that lives as long
    as the block: load the model inside it."""
    if sum(x is not None for x in (checkpoint, hf, init_preset)) != 1:
        raise ScorerError("give exactly one model source: a checkpoint, an HF directory or an "
                          "init preset")
    if init_preset is not None:
        yield _init_source(init_preset, tokenizer, model_preset)
        return
    if hf and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ScorerError("--hf scores in one process; for TP/PP, import first "
                          "(tools/convert_hf.py import) and pass --checkpoint")
    with tempfile.TemporaryDirectory(prefix="polar_score_") as tmp:
        yield _checkpoint_source(checkpoint, hf, Path(tmp), tokenizer, model_preset)


def _init_source(init_preset: str, tokenizer: Optional[str],
                 model_preset: Optional[str]) -> ModelSource:
    from megatron_polar.model.presets import get_preset

    if model_preset is not None and model_preset != init_preset:
        raise ScorerError("--init-preset names the architecture; leave out --model-preset")
    if tokenizer is None:
        raise ScorerError("a freshly initialised model carries no tokenizer; pass --tokenizer")
    try:
        preset = get_preset(init_preset)
    except ValueError as e:
        raise ScorerError(str(e)) from None
    return ModelSource("init", None, None, preset, Path(tokenizer))


def _checkpoint_source(checkpoint: Optional[str], hf: Optional[str], tmp: Path,
                       tokenizer: Optional[str], model_preset: Optional[str]) -> ModelSource:
    from megatron_polar.convert.hf_config import ConversionError
    from megatron_polar.runtime.checkpoints import CheckpointError, read_manifest

    try:
        if hf:
            from megatron_polar.convert.importer import import_hf

            import_hf(hf, tmp / "ckpt", tokenizer=tokenizer)
        manifest = read_manifest(tmp / "ckpt" if hf else checkpoint)
        preset = manifest.preset_for(model_preset)
        tok = manifest.tokenizer_for(tokenizer)
    except (ConversionError, CheckpointError, ValueError) as e:
        raise ScorerError(str(e)) from None
    return ModelSource("hf" if hf else "checkpoint", hf or checkpoint, manifest.directory,
                       preset, tok)


def score_sequences(chunks, ctx, sequences: list[list[int]], token_budget: int,
                    pad_id: int, shared_prefix: bool = True) -> Optional[list[float]]:
    """Rewards of `sequences` in order (on the last pipeline stage; None elsewhere). With
    `shared_prefix`, sequences that share a prefix (several candidates for one prompt and
    reference) are scored as one shared-prefix item, the prefix computed once: the same
    rewards (causal attention), fewer tokens."""
    from megatron_polar.data.packing import pack_pairs, pack_sequences
    from megatron_polar.runtime.schedules import score_packed

    if not sequences:
        return []
    if shared_prefix:
        budget = max(token_budget, max(len(s) for s in sequences))
        packed = pack_sequences(sequences, budget, pad_id)
        rewards = score_packed(chunks, [pack for pack, _ in packed], ctx)
        if rewards is None:
            return None
        out = [0.0] * len(sequences)
        for i, reward in zip((i for _, members in packed for i in members), rewards.tolist()):
            out[i] = reward
        return out
    # The packer moves pairs; two sequences make a "pair" here (the last one doubled if odd).
    padded = sequences + ([sequences[-1]] if len(sequences) % 2 else [])
    pairs = [(padded[i], padded[i + 1]) for i in range(0, len(padded), 2)]
    budget = max(token_budget, max(len(a) + len(b) for a, b in pairs))
    packs = pack_pairs(pairs, budget, pad_id)
    rewards = score_packed(chunks, packs, ctx)
    if rewards is None:
        return None
    by_pair, k = {}, 0
    for pack in packs:
        for pair_id in pack.pair_ids:
            by_pair[pair_id] = (rewards[k].item(), rewards[k + 1].item())
            k += 2
    flat = [r for i in range(len(pairs)) for r in by_pair[i]]
    return flat[:len(sequences)]


class RewardScorer:
    """A loaded reward model: `score(records) -> rewards`, on every rank.

    Build one with `from_checkpoint`, `from_hf`, `from_init` (or, from a tool's flags,
    `eval.flags.scorer_from_args`), or `load` a
    resolved `ModelSource`. Every rank of the job must call `score` with the same records
    (it runs megatron's schedules, which are collective)."""

    # Candidates that share a prompt and reference are scored with the prefix computed once
    # (exact; see `score_sequences`). False scores every sequence whole.
    shared_prefix: bool = True

    def __init__(self, chunks, ctx: "ParallelContext", source: ModelSource,
                 encoder: TripletEncoder, micro_batch_tokens: int = 8192):
        self.chunks, self.ctx, self.source = chunks, ctx, source
        self.encoder = encoder
        self.micro_batch_tokens = micro_batch_tokens

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(cls, source: ModelSource, run: Optional["ModelRunConfig"] = None, *,
             encoding: EncodingConfig = EncodingConfig(), encoder: Optional[TripletEncoder] = None,
             micro_batch_tokens: int = 8192) -> "RewardScorer":
        """Build the model for `source` at `run`'s layout (default TP=PP=1, fp32) and load its
        weights; a source without a checkpoint is initialised with `run.seed`."""
        from megatron_polar.model.config import ModelRunConfig
        from megatron_polar.runtime.checkpoints import CheckpointError, load_model_weights
        from megatron_polar.runtime.chunks import build_inference_chunks
        from megatron_polar.runtime.parallel import (ParallelLayoutError, parallel_context,
                                                     seed_everything)

        run = run or ModelRunConfig()
        try:
            encoder = encoder or source.encoder(encoding)
        except (ValueError, FileNotFoundError) as e:
            raise ScorerError(f"tokenizer {source.tokenizer}: {e}") from None
        # Only the vocabulary has to fit: the reward and separator ids are the tokenizer's,
        # as in the data the model was trained on.
        if encoder.tok.vocab_size > source.preset.vocab_size:
            raise ScorerError(f"tokenizer {source.tokenizer} has {encoder.tok.vocab_size} "
                              f"tokens, more than the model's vocab_size "
                              f"{source.preset.vocab_size}")
        try:
            ctx = parallel_context(run)
        except ParallelLayoutError as e:
            raise ScorerError(str(e)) from None
        if source.checkpoint is None:
            # Seeded right before the build, so the weights depend on the seed alone, not on
            # what consumed random numbers earlier in the process.
            seed_everything(run.seed, ctx)
        # Weights only: no DDP gradient buffer, no gradients (a scorer never trains).
        chunks = build_inference_chunks(source.preset, run, ctx)
        if source.checkpoint is not None:
            try:
                load_model_weights(chunks, source.checkpoint)
            except CheckpointError as e:
                raise ScorerError(str(e)) from None
        return cls(chunks, ctx, source, encoder, micro_batch_tokens)

    @classmethod
    def from_checkpoint(cls, path: str, *, tokenizer: Optional[str] = None,
                        model_preset: Optional[str] = None, **load_kwargs) -> "RewardScorer":
        """A megatron checkpoint: run dir (latest iteration), iter_N dir or weights checkpoint;
        preset and tokenizer default to those kept in it. `load_kwargs` as `load`."""
        with open_source(checkpoint=path, tokenizer=tokenizer, model_preset=model_preset) as s:
            return cls.load(s, **load_kwargs)

    @classmethod
    def from_hf(cls, hf_dir: str, *, tokenizer: Optional[str] = None,
                model_preset: Optional[str] = None, **load_kwargs) -> "RewardScorer":
        """An HF InternLM2ForRewardModel directory, imported on the fly (one process only)."""
        with open_source(hf=hf_dir, tokenizer=tokenizer, model_preset=model_preset) as s:
            return cls.load(s, **load_kwargs)

    @classmethod
    def from_init(cls, preset: str, tokenizer: str, *, seed: int = 1234,
                  run: Optional["ModelRunConfig"] = None, **load_kwargs) -> "RewardScorer":
        """A randomly initialised model of `preset` (name or model.json): the chance baseline."""
        from megatron_polar.model.config import ModelRunConfig

        run = replace(run or ModelRunConfig(), seed=seed)
        with open_source(init_preset=preset, tokenizer=tokenizer) as s:
            return cls.load(s, run, **load_kwargs)

    # -- scoring --------------------------------------------------------------------------------

    @property
    def preset(self) -> "ModelPreset":
        return self.source.preset

    def encode(self, record: ScoreRecord) -> list[int]:
        """The token ids of one record, as training builds them; RecordError names the record."""
        try:
            return self.encoder.encode_sequence(record.prompt, record.reference,
                                                record.candidate, record.wrapper)
        except RecordError as e:
            raise RecordError(f"{record.where}: {e}" if record.where else str(e)) from None

    def score(self, records: Sequence[ScoreRecord]) -> list[float]:
        """Rewards of `records` in order, on every rank. All records are encoded before the
        model runs, so a bad one fails fast."""
        return self.score_ids([self.encode(r) for r in records])

    __call__ = score  # a RewardScorer is the `score_fn` the evaluations take

    def score_ids(self, sequences: Sequence[list[int]]) -> list[float]:
        """Rewards of already-encoded sequences, in order, on every rank."""
        rewards: list[float] = []
        for start in range(0, len(sequences), SEQUENCES_PER_PASS):
            part = list(sequences[start:start + SEQUENCES_PER_PASS])
            rewards += self._everywhere(score_sequences(
                self.chunks, self.ctx, part, self.micro_batch_tokens, self.preset.pad_token_id,
                self.shared_prefix), len(part))
        return rewards

    def _everywhere(self, rewards: Optional[list[float]], n: int) -> list[float]:
        """The last stage's rewards on every pipeline stage (float64: the values are exact)."""
        if self.ctx.pp_size == 1:
            return rewards
        import torch

        from megatron_polar.runtime.device import compute_device

        t = torch.tensor(rewards if rewards is not None else [0.0] * n, dtype=torch.float64,
                         device=compute_device())
        torch.distributed.broadcast(t, src=self.ctx.pp_last_global_rank, group=self.ctx.pg.pp)
        return t.tolist()
