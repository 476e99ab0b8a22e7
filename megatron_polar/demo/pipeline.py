"""The demo pipeline, stage by stage: corpus -> tokenizer -> policy pool -> sampling -> triplets
-> POLAR pre-training -> ranked SFT -> evaluation -> HF export -> scoring with the export.

Every stage writes into its own directory under the work directory and finishes by writing
`stage.json` (its settings and results). A re-run reuses a stage whose `stage.json` records the
same settings, and redoes it (from scratch, or resuming where its tool resumes: sampling and
training) otherwise. Training, export and scoring run the project's own CLIs as subprocesses,
exactly as a user would; the rest calls the same library functions those CLIs call.

The stages themselves: data_stages.py (corpus to datasets) and model_stages.py (training,
evaluation, export, scoring); the machinery that reuses finished stages: runner.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_polar.demo.corpus import SOURCES
from megatron_polar.demo.data_stages import DataStages
from megatron_polar.demo.model_stages import ModelStages, pair_accuracy
from megatron_polar.demo.policies import PolicyRun
from megatron_polar.demo.runner import Stage, run_stage

__all__ = ["DemoConfig", "DemoPipeline", "Stage", "run_stage", "pair_accuracy"]


@dataclass
class DemoConfig:
    """Everything the demo does, as data. Defaults: ~8-9 minutes on 2 CPU cores (docs/demo.md)."""

    workdir: str = "runs/demo"
    seed: int = 1234
    # The corpus: the pinned packages' sources it reads, and as what kind of text (corpus.py).
    corpus_sources: tuple = SOURCES
    vocab_size: int = 2048
    # The pool: checkpoints of three runs, one per kind of text (corpus.py): prose, Python
    # code, C++ (13 policies).
    runs: tuple[PolicyRun, ...] = (
        PolicyRun("prose", {"prose": 1.0}, (25, 50, 100, 200, 300), seed=1),
        PolicyRun("code", {"code": 1.0}, (50, 100, 150, 300), seed=2),
        PolicyRun("cpp", {"cpp": 1.0}, (50, 100, 150, 300), seed=3),
    )
    # Never trained on: the evaluation's policies (one of each run).
    held_out: tuple[str, ...] = ("prose-100", "code-150", "cpp-150")
    # Prompts: corpus prefixes. Every `eval_every`-th prompt is kept for evaluation only, and
    # every `preference_every`-th of those also serves the preference protocol
    # (DataStages.shards, data_stages.py).
    num_prompts: int = 1350
    eval_every: int = 3
    preference_every: int = 3
    max_prefix_tokens: int = 16
    max_new_tokens: int = 48
    sampling_batch_size: int = 256
    # Worker processes for the pool, the base LM and sampling, and torch threads in each
    # (workers.py); the trainer's torch threads. Results do not depend on `workers`.
    workers: int = 2
    threads: int = 1
    train_threads: int = 2
    # The reward model: the tiny preset's shape with the demo vocabulary.
    rm_shape: dict = field(default_factory=lambda: dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=176, max_position_embeddings=1024))
    max_length: int = 1024
    base_steps: int = 300
    pretrain_iters: int = 400
    pretrain_lr: float = 2e-3
    sft_iters: int = 60
    sft_lr: float = 2e-4
    global_batch_size: int = 32
    micro_batch_tokens: int = 2048

    def key(self, *names: str) -> str:
        """A hash of the named settings: what a stage's result depends on."""
        values = {n: _plain(getattr(self, n)) for n in names}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def training_policies(self) -> list[str]:
        return [p for run in self.runs for p in run.policy_names() if p not in self.held_out]


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


# ---- the pipeline ------------------------------------------------------------------------------

class DemoPipeline(DataStages, ModelStages):
    """The demo's stages (data_stages.py, model_stages.py), chained by their keys (`stage`)."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.work = Path(cfg.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self._last_key = ""
        self._keys: dict[str, str] = {}

    def stage(self, name: str, *settings: str, after: Optional[tuple[str, ...]] = None) -> Stage:
        """The next stage. The pipeline is a chain, so a stage's key covers its own settings
        and the key of the stage before it (or of the stages named in `after`): anything
        redone upstream is redone downstream."""
        upstream = self._last_key if after is None else "+".join(self._keys[a] for a in after)
        key = hashlib.sha256(f"{upstream}/{self.cfg.key(*settings)}".encode()).hexdigest()
        self._last_key = key[:16]
        self._keys[name] = self._last_key
        return Stage(self.work, name, self._last_key)

    def run(self) -> dict:
        start = time.time()
        report = {"corpus": self.corpus(), "tokenizer": self.tokenizer()}
        report["pool"], report["base"] = self.pool_and_base()
        report["sampling"] = self.sampling()
        report["datasets"] = self.datasets()
        report["pretrain"] = self.pretrain()
        report["sft"] = self.sft()
        report["evaluate"] = self.evaluate()
        report["export"] = self.export_and_score()
        report["wall_seconds"] = round(time.time() - start, 1)
        return report
