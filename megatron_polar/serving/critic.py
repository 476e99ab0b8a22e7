"""The PPO critic beside the POLAR reward (NeMo-Aligner's `combine_rm_and_critic_server`).

The value model is a second copy of the POLAR network: the backbone loaded from the POLAR
checkpoint, and the reward head used as a per-token value head (NeMo-Aligner and OpenRLHF also
start the critic from the reward model). It reads the actor's token ids directly, so the actor
must share the reward model's vocabulary (`CriticService` refuses ids outside it).

Shapes follow NeMo-Aligner 0.7.0's critic server: `values` [B, S] (position t is the value of
the prefix ending at token t; the actor keeps the first S-1), `returns`, `prev_values`, `mask`
[B, S-1]. Training is megatron-core's: DDP, megatron's Adam, forward-backward schedules. The
loss is NeMo-Aligner's clipped value loss,

    v_clip = prev + clamp(v - prev, -clip, clip)
    loss   = 0.5 * mean over mask of max((v - R)^2, (v_clip - R)^2),

averaged over every masked token of a global batch (megatron's per-token loss contract), with
one optimizer step per `global_batch_size` sequences; `train` returns the mean loss of its steps.
`save` writes a megatron training checkpoint (model + optimizer) that `--critic-load` resumes
and any of our tools can read as weights.

PPO sends several responses per prompt, so rows share long prefixes. With
`CriticService.shared_prefix` (the default) both inference and training run the rows as
shared-prefix packs (data/packing.py, model/shared_prefix.py): rows that share a prefix form
one item, the prefix computed once, each row's remainder attending to it. With causal
attention the value at token t of a row depends only on its tokens 0..t, so every value is the
padded batch's (up to float rounding), and so are the loss and its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from megatron_polar.config.flags import option
from megatron_polar.serving.collective import Collective
from megatron_polar.serving.rewards import RequestError

if TYPE_CHECKING:
    from megatron_polar.data.packing import PackedMicroBatch


@dataclass(frozen=True)
class CriticConfig:
    # Flags --critic-lr, --critic-loss-clip, ... (serving/__main__.py).
    lr: float = option(1e-5)  # POLAR's PPO recipe
    clip: float = option(0.2, flag="--critic-loss-clip")  # NeMo-Aligner's loss_clip_val
    weight_decay: float = option(0.0)
    clip_grad: float = option(1.0)
    global_batch_size: int = option(64)  # sequences per optimizer step
    micro_batch_size: int = option(4)  # sequences per forward-backward micro-batch
    save_dir: Optional[str] = option(None, flag="--critic-save",
                                     help="where critic_save writes checkpoints")
    # B x S of one request: the server's --max-request-tokens
    max_tokens: int = option(4 * 1024 * 1024, cli=False)


# Most tokens one shared-prefix pack of `_values` computes (one forward each). The padded path
# ran the whole [B, S] request in one forward; packs of at most this many tokens keep the
# forward's activations and the flex block mask (O((T / 128)^2)) bounded on large requests,
# while 32k tokens per forward already keep a GPU busy. A longer row gets a pack of its own.
VALUE_PACK_TOKENS = 32768


@dataclass
class _CriticMicroBatch:
    tokens: torch.Tensor  # [b, S]
    position_ids: torch.Tensor
    returns: torch.Tensor  # [b, S-1]
    prev_values: torch.Tensor
    mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class RowPack:
    """A shared-prefix pack of rows and where each row's tokens lie in it: token t of row
    `rows[k]` is at pack position `positions[k][t]` (its item's prefix for t < the prefix
    length, its own candidate after)."""

    batch: "PackedMicroBatch"
    rows: list[int]
    positions: list[np.ndarray]

    def gather_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, token, pack position) of every token of every row, flat."""
        if not self.rows:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        rows = np.concatenate([np.full(len(p), r, dtype=np.int64)
                               for r, p in zip(self.rows, self.positions)])
        cols = np.concatenate([np.arange(len(p), dtype=np.int64) for p in self.positions])
        return rows, cols, np.concatenate(self.positions).astype(np.int64)


def pack_rows(rows: Sequence[Sequence[int]], token_budget: int, pad_id: int,
              pad_multiple: int = 64) -> list[RowPack]:
    """Rows (token ids; empty ones are left out) grouped by common prefix (`prefix_groups`)
    into shared-prefix items, packed best-fit into packs of at most `token_budget` tokens
    (rounded down to a multiple of `pad_multiple`; a row longer than that gets a pack of its
    own), all padded to one length, a multiple of `pad_multiple`."""
    from megatron_polar.data.packing import pack_sequences

    keep = [i for i, r in enumerate(rows) if len(r) > 0]
    if not keep:
        return []
    seqs = [list(rows[i]) for i in keep]
    longest = max(len(s) for s in seqs)
    budget = max(token_budget // pad_multiple, -(-longest // pad_multiple)) * pad_multiple
    out = []
    for pack, members in pack_sequences(seqs, budget, pad_id, pad_multiple):
        positions, at = [], 0
        for p, cands in pack.items:
            prefix = np.arange(at, at + p, dtype=np.int64)
            at += p
            for c in cands:
                positions.append(np.concatenate([prefix, np.arange(at, at + c, dtype=np.int64)]))
                at += c
        out.append(RowPack(pack, [keep[i] for i in members], positions))
    return out


@dataclass
class _CriticPack:
    """A training micro-batch of shared-prefix packed rows: the values at `index` (pack
    positions) against the rows' returns, old values and mask there, flat."""

    pack: "PackedMicroBatch"
    index: torch.Tensor  # [N] int64
    returns: torch.Tensor  # [N]
    prev_values: torch.Tensor
    mask: torch.Tensor
    count: int  # int(mask.sum()) over the pack's rows, as `_CriticMicroBatch.num_tokens`

    @property
    def tokens(self) -> torch.Tensor:  # [1, T]: run_schedule reads the micro-batch length
        return self.pack.tokens

    @property
    def num_tokens(self) -> int:
        return self.count


def clipped_value_loss(values: torch.Tensor, returns: torch.Tensor, prev_values: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> torch.Tensor:
    """Summed (not averaged) 0.5 * max((v - R)^2, (v_clip - R)^2) over the masked positions."""
    loss = (values - returns) ** 2
    if clip > 0:
        clipped = prev_values + (values - prev_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * (loss * mask).sum()


class CriticService:
    """Value inference, training and saving on one value model (single stage)."""

    # Rows that share a prefix (the n responses to one prompt) run as shared-prefix packs, the
    # prefix computed once (exact; see the module docstring). False runs the padded [B, S]
    # rows, as NeMo-Aligner's critic does. A class attribute, not a CriticConfig field: those
    # are command-line flags.
    shared_prefix: bool = True

    def __init__(self, chunks, optimizer, ctx, config: CriticConfig, vocab_size: int,
                 collective: Optional[Collective] = None):
        from megatron_polar.runtime.chunks import unwrap

        if ctx.pp_size != 1 or len(chunks) != 1:
            raise ValueError("the critic runs on one pipeline stage (PP=1)")
        self.chunks, self.optimizer, self.ctx, self.config = chunks, optimizer, ctx, config
        self.vocab_size = vocab_size
        self.model = chunks[0]
        self.core = unwrap(self.model)
        self.steps = 0
        self._writer = None
        # Public methods check their inputs (on rank 0), then run the work on every rank.
        self.collective = collective or Collective()
        self.collective.register("critic_values", self._values)
        self.collective.register("critic_train", self._train)
        self.collective.register("critic_save", self._save)

    @classmethod
    def build(cls, source, run, config: CriticConfig, collective: Optional[Collective] = None,
              load: Optional[str] = None) -> "CriticService":
        """A value model from `source` (a `ModelSource`: the POLAR checkpoint) or, with `load`,
        resumed from a critic checkpoint this class saved."""
        from megatron_polar.runtime.checkpoints import load_model_weights, resolve_checkpoint_dir
        from megatron_polar.runtime.chunks import build_model_chunks
        from megatron_polar.runtime.parallel import parallel_context
        from megatron_polar.training.checkpointing import load_checkpoint
        from megatron_polar.training.optimizer import OptimizerSettings, build_optimizer

        if source.checkpoint is None and load is None:
            raise ValueError("the critic starts from a trained POLAR model; give a checkpoint")
        ctx = parallel_context(run)
        chunks = build_model_chunks(source.preset, run, ctx)
        # a constant LR: PPO's critic has no schedule of its own (min_lr None)
        optimizer = build_optimizer(chunks, OptimizerSettings(
            lr=config.lr, weight_decay=config.weight_decay, clip_grad=config.clip_grad),
            ctx, bf16=run.bf16)
        service = cls(chunks, optimizer, ctx, config, source.preset.vocab_size, collective)
        if load is not None:
            common = load_checkpoint(resolve_checkpoint_dir(load), chunks, optimizer, ctx)
            service.steps = int(common.get("critic_steps", 0))
        else:
            load_model_weights(chunks, source.checkpoint)
        return service

    # -- inference --------------------------------------------------------------------------------

    def _check_ids(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise RequestError(f"token ids must lie in 0..{self.vocab_size - 1} (the value "
                               "model's vocabulary); the critic needs the actor to share the "
                               "reward model's tokenizer")

    def values(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """float32 [B, S] per-token values; positions at or after a sequence's length are 0."""
        self._check_ids(tokens)
        return self.collective.run("critic_values", np.asarray(tokens), np.asarray(lengths))

    @property
    def _pad_id(self) -> int:
        preset = getattr(self.core, "preset", None)
        return int(preset.pad_token_id) if preset is not None else 0

    @property
    def _pad_multiple(self) -> int:
        # Aligned pack lengths, as training's (training/batches.py): sequence parallelism
        # splits a pack across the TP ranks.
        return math.lcm(64, self.ctx.tp_size)

    @torch.no_grad()
    def _values(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if not self.shared_prefix:
            return self._values_padded(tokens, lengths)
        from megatron_polar.runtime.device import compute_device
        from megatron_polar.runtime.schedules import forward_scores

        tokens = np.asarray(tokens)
        batch, width = tokens.shape
        # As the padded path: positions at or after a row's length are 0, a length past the
        # row's width covers the whole row. Values at t < length need tokens 0..t only.
        lengths = np.clip(np.asarray(lengths).reshape(-1), 0, width).astype(np.int64)
        device = compute_device()
        out = torch.zeros(batch, width, dtype=torch.float32, device=device)
        packs = pack_rows([tokens[b, :n].tolist() for b, n in enumerate(lengths.tolist())],
                          VALUE_PACK_TOKENS, self._pad_id, self._pad_multiple)
        self.model.eval()
        try:
            for rp in packs:
                scores = forward_scores(self.model, rp.batch)[0, :, 0].float()
                rows, cols, at = (torch.from_numpy(a).to(device) for a in rp.gather_index())
                out[rows, cols] = scores[at]
        finally:
            self.model.train()
        return out.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def _values_padded(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        from megatron_polar.runtime.device import compute_device

        device = compute_device()
        t = torch.as_tensor(tokens, dtype=torch.long, device=device)
        pos = torch.arange(t.shape[1], device=device).expand_as(t).contiguous()
        self.model.eval()
        try:
            scores = self.model(t, pos, None)[..., 0].float()
        finally:
            self.model.train()
        valid = torch.arange(t.shape[1], device=device)[None, :] < torch.as_tensor(
            lengths, device=device).reshape(-1, 1)
        return (scores * valid).cpu().numpy().astype(np.float32)

    # -- training --------------------------------------------------------------------------------

    def _check_train_batch(self, tokens, returns, prev_values, mask):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
            raise RequestError(f"'tokens' must be [batch >= 1, seq >= 2], got "
                               f"{list(tokens.shape)}")
        want = [tokens.shape[0], tokens.shape[1] - 1]
        for name, arr in (("returns", returns), ("prev_values", prev_values), ("mask", mask)):
            if list(np.shape(arr)) != want:
                raise RequestError(f"'{name}' must be [batch, seq - 1] = {want}, got "
                                   f"{list(np.shape(arr))}")
            if not np.isfinite(arr).all():
                raise RequestError(f"'{name}' has non-finite values")
        if tokens.size > self.config.max_tokens:
            raise RequestError(f"request of {tokens.size} tokens exceeds the server's limit "
                               f"of {self.config.max_tokens}")
        self._check_ids(tokens)
        if not np.asarray(mask).any():
            raise RequestError("'mask' selects no position")

    def train(self, tokens, returns, prev_values, mask) -> float:
        """Optimizer steps over the rollout batch; the mean value loss of the steps."""
        self._check_train_batch(tokens, returns, prev_values, mask)
        return self.collective.run("critic_train", *(np.asarray(a) for a in
                                                     (tokens, returns, prev_values, mask)))

    def _train(self, tokens, returns, prev_values, mask) -> float:
        from megatron_polar.runtime.schedules import run_schedule
        from megatron_polar.training.step import guarded_optimizer_step

        cfg = self.config
        as_t = partial(torch.as_tensor, dtype=torch.float32)
        tokens_t = torch.as_tensor(tokens, dtype=torch.long)
        data = [tokens_t, as_t(returns), as_t(prev_values), as_t(mask)]
        step = _shared_value_forward_step if self.shared_prefix else _value_forward_step
        losses = []
        for start in range(0, tokens_t.shape[0], cfg.global_batch_size):
            part = [d[start:start + cfg.global_batch_size] for d in data]
            if self.shared_prefix:
                micro = self._shared_micro_batches(*part)
            else:
                micro = [_micro_batch(*(d[i:i + cfg.micro_batch_size] for d in part))
                         for i in range(0, part[0].shape[0], cfg.micro_batch_size)]
            micro = [m for m in micro if m.num_tokens > 0]
            if not micro:
                continue
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            outputs = run_schedule(self.chunks, micro, forward_only=False, ctx=self.ctx,
                                   forward_step=partial(step, clip=cfg.clip))
            total = sum(float(o["loss_sum"]) for o in outputs)
            count = sum(m.num_tokens for m in micro)
            loss = total / count
            ok, _ = guarded_optimizer_step(self.optimizer, bool(np.isfinite(loss)))
            if ok:
                self.steps += 1
            losses.append(loss)
        return float(np.mean(losses))

    def _shared_micro_batches(self, tokens, returns, prev_values, mask) -> list[_CriticPack]:
        """One global batch's rows as shared-prefix packs, whole prefix groups per pack.

        A row's loss reads the values at its masked positions t (token t's value depends on
        tokens 0..t only), so it needs its tokens up to its last masked position; rows with
        no masked position add nothing (as their zero mask does in the padded path) and are
        left out. Each pack holds at most `micro_batch_size` x S tokens (rounded down to the
        pack alignment, or one row rounded up to it), what one padded micro-batch computes,
        so activation memory does not exceed the padded path's, while a
        pack holds as many rows as fit once their shared prefixes are counted once (a row
        limit of `micro_batch_size` would forfeit most of the saving). The loss sum and the
        token count (the masked positions) are the padded path's; megatron's per-token loss
        divides the gradient by the count of the whole step, so how rows fall into
        micro-batches does not change it."""
        mask_np = mask.numpy()
        width = tokens.shape[1]
        extent = [int(np.flatnonzero(m)[-1]) + 1 if m.any() else 0 for m in mask_np]
        rows = [tokens[b, :n].tolist() for b, n in enumerate(extent)]
        budget = self.config.micro_batch_size * width
        out = []
        for rp in pack_rows(rows, budget, self._pad_id, self._pad_multiple):
            rows_i, cols, at = (torch.from_numpy(a) for a in rp.gather_index())
            out.append(_CriticPack(
                rp.batch, at, returns[rows_i, cols], prev_values[rows_i, cols],
                mask[rows_i, cols], int(mask[rp.rows].sum())))
        return out

    # -- saving ----------------------------------------------------------------------------------

    def save(self) -> str:
        if self.config.save_dir is None:
            raise RequestError("this critic has no --critic-save directory")
        return self.collective.run("critic_save")

    def _save(self) -> str:
        from megatron_polar.training.checkpointing import CheckpointWriter, training_state_dict

        if self._writer is None:
            self._writer = CheckpointWriter(self.config.save_dir)
        common = {"critic_steps": self.steps,
                  "layout": {"tp": self.ctx.tp_size, "pp": self.ctx.pp_size}}
        self._writer.save(self.steps, training_state_dict(self.chunks, self.optimizer,
                                                          self.ctx, common=common))
        return f"{self.config.save_dir}/iter_{self.steps:07d}"


def _micro_batch(tokens, returns, prev_values, mask) -> _CriticMicroBatch:
    pos = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    return _CriticMicroBatch(tokens, pos, returns, prev_values, mask)


def _value_forward_step(data_iterator, model, clip: float):
    from megatron_polar.runtime.device import compute_device

    mb: _CriticMicroBatch = next(data_iterator)
    device = compute_device()
    scores = model(mb.tokens.to(device), mb.position_ids.to(device), None)
    return scores, partial(_value_loss, mb, clip)


def _value_loss(mb: _CriticMicroBatch, clip: float, scores: torch.Tensor):
    values = scores[:, :-1, 0].float()  # the value of each prefix but the full sequence
    device = values.device
    loss = clipped_value_loss(values, mb.returns.to(device), mb.prev_values.to(device),
                              mb.mask.to(device), clip)
    count = torch.tensor(mb.num_tokens, dtype=torch.int, device=device)
    return loss, count, {"loss_sum": loss.detach()}


def _shared_value_forward_step(data_iterator, model, clip: float):
    from megatron_polar.runtime.schedules import forward_scores

    mb: _CriticPack = next(data_iterator)
    return forward_scores(model, mb.pack), partial(_shared_value_loss, mb, clip)


def _shared_value_loss(mb: _CriticPack, clip: float, scores: torch.Tensor):
    device = scores.device
    values = scores[0, mb.index.to(device), 0].float()  # each row's positions, flat
    loss = clipped_value_loss(values, mb.returns.to(device), mb.prev_values.to(device),
                              mb.mask.to(device), clip)
    count = torch.tensor(mb.num_tokens, dtype=torch.int, device=device)
    return loss, count, {"loss_sum": loss.detach()}
