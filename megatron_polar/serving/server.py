"""Assembling the server from the CLI flags: model, references, critic, front ends.

Under torchrun (TP/PP) every rank builds the models; rank 0 alone runs the front ends and
the others follow its model operations (collective.py).

`RewardServer` is a context manager that starts PyTriton (NeMo-Aligner's models) and the
/pooling HTTP server in the background and stops both on exit; tests and benchmarks use it
in-process, `python -m megatron_polar.serving` around a wait for SIGTERM.
"""

from __future__ import annotations

import os
from typing import Optional

from megatron_polar.serving.triton_models import TritonSettings


class ServerError(RuntimeError):
    """A server that cannot start; the message says why (exit status 2)."""


class RewardServer:
    def __init__(self, service, settings: TritonSettings, critic=None,
                 pooling_port: Optional[int] = 23333, pooling_model_name: str = "polar"):
        self.service, self.settings, self.critic = service, settings, critic
        self.pooling_port = pooling_port
        self.pooling_model_name = pooling_model_name
        self._triton = None
        self._pooling = None

    @property
    def is_front(self) -> bool:
        """Rank 0 serves; the other ranks of a TP/PP model follow its operations."""
        return self.service.collective.rank == 0

    def follow(self) -> None:
        """On ranks > 0: run the model operations rank 0 broadcasts, until it stops."""
        self.service.collective.follow()

    def __enter__(self) -> "RewardServer":
        if not self.is_front:
            return self
        from megatron_polar.serving.pooling import PoolingServer
        from megatron_polar.serving.triton_models import (bind_critic, bind_reward_model,
                                                          prefer_own_libpython, triton_config)

        try:
            if self.pooling_port:
                self._pooling = PoolingServer(self.service, self.settings.host, self.pooling_port,
                                              self.pooling_model_name)
                self._pooling.start()
            prefer_own_libpython()
            from pytriton.triton import Triton

            self._triton = Triton(config=triton_config(self.settings))
            if self.service.references is not None:
                bind_reward_model(self._triton, self.service, self.settings)
                if self.critic is not None:
                    bind_critic(self._triton, self.service, self.critic, self.settings)
            self._triton.run()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self.is_front:
            return
        if self._triton is not None:
            self._triton.stop()
            self._triton = None
        if self._pooling is not None:
            self._pooling.shutdown()
            self._pooling.server_close()
            self._pooling = None
        self.service.collective.stop()

    def describe(self) -> dict:
        models = []
        if self.service.references is not None:
            models.append(self.settings.reward_model_name)
            if self.critic is not None:
                models += ["critic_infer", "critic_train", "critic_save"]
        return {"pid": os.getpid(), "host": self.settings.host,
                "triton_http_port": self.settings.http_port,
                "triton_models": models,
                "pooling_port": self.pooling_port or None,
                "references": len(self.service.references or ())}


def build_server(args) -> RewardServer:
    """Load everything the flags name; ServerError for anything a user can fix."""
    from megatron_polar.data.encoding import RecordError
    from megatron_polar.config.flags import from_namespace
    from megatron_polar.eval.flags import scoring_limits, source_from_args
    from megatron_polar.eval.scorer import RewardScorer, ScorerError
    from megatron_polar.serving.postprocess import PostprocessConfig, RewardPostprocessor
    from megatron_polar.serving.references import (ActorTokenizer, ReferenceTable,
                                                   optional_int_list)
    from megatron_polar.serving.collective import Collective
    from megatron_polar.serving.rewards import PolarRewardService, RequestLimits
    from megatron_polar.training.arguments import run_config_from_args

    if args.critic and args.references is None:
        raise ServerError("--critic serves NeMo-Aligner, whose requests need --references")
    try:
        post = RewardPostprocessor(from_namespace(PostprocessConfig, args, prefix="reward_"))
        limits = scoring_limits(args)
    except ValueError as e:
        raise ServerError(str(e)) from None
    try:
        with source_from_args(args) as source:
            references = None
            if args.references is not None:
                actor = ActorTokenizer(args.actor_tokenizer or source.tokenizer,
                                       eos_ids=optional_int_list(args.actor_eos_ids))
                references = ReferenceTable.from_file(args.references, actor)
            run = run_config_from_args(args, source.preset.num_layers)
            scorer = RewardScorer.load(source, run, encoding=limits.encoding,
                                       micro_batch_tokens=limits.micro_batch_tokens)
            # Built after the model: megatron's process groups exist by then.
            collective = Collective()
            critic = _build_critic(args, source, run, collective) if args.critic else None
    except (ScorerError, RecordError, FileNotFoundError, ValueError) as e:
        raise ServerError(str(e)) from None
    service = PolarRewardService(
        scorer, references, post, args.unknown_prompt_reward,
        from_namespace(RequestLimits, args, max_batch_size=args.max_batch_size), collective)
    settings = from_namespace(TritonSettings, args)
    return RewardServer(service, settings, critic, args.pooling_port)


def _build_critic(args, source, run, collective):
    from megatron_polar.config.flags import from_namespace
    from megatron_polar.serving.critic import CriticConfig, CriticService

    config = from_namespace(CriticConfig, args, prefix="critic_",
                            max_tokens=args.max_request_tokens)
    # A second model beside the reward model, at the same layout; its weights are loaded.
    return CriticService.build(source, run, config, collective=collective, load=args.critic_load)
