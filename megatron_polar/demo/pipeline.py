"""The demo pipeline, stage by stage: corpus -> tokenizer -> policy pool -> sampling -> triplets
-> POLAR pre-training -> ranked SFT -> evaluation -> HF export -> scoring with the export.

Every stage writes into its own directory under the work directory and finishes by writing
`stage.json` (its settings and results). A re-run reuses a stage whose `stage.json` records the
same settings, and redoes it (from scratch, or resuming where its tool resumes: sampling and
training) otherwise. Training, export and scoring run the project's own CLIs as subprocesses,
exactly as a user would; the rest calls the same library functions those CLIs call.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from megatron_polar.data.records import atomic_file
from megatron_polar.demo.corpus import KINDS, SOURCES
from megatron_polar.demo.policies import PolicyRun

REPO = Path(__file__).resolve().parents[2]


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
    # every `preference_every`-th of those also serves the preference protocol (pipeline.shards).
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


# ---- stages ------------------------------------------------------------------------------------

class Stage:
    """A directory plus `stage.json`: done when it records the same key."""

    def __init__(self, workdir: Path, name: str, key: str):
        self.dir = workdir / name
        self.name, self.key = name, key
        self.stamp = self.dir / "stage.json"

    def done(self) -> Optional[dict]:
        if self.stamp.is_file():
            data = json.loads(self.stamp.read_text())
            if data.get("key") == self.key:
                return data["result"]
        return None

    def finish(self, result: dict) -> dict:
        with atomic_file(self.stamp) as f:
            f.write(json.dumps({"key": self.key, "result": result}, indent=2).encode())
        return result


def run_stage(stage: Stage, work: Callable[[Stage, "Bar"], dict], total: int, unit: str,
              fresh: bool = True) -> dict:
    """Reuse `stage` if done, else run `work(stage, bar)` under a progress bar."""
    found = stage.done()
    if found is not None:
        print(f"[{stage.name}] reused ({stage.dir})")
        return found
    # A stage that resumes (sampling, training) continues only work begun with its settings.
    started = stage.dir / "started.json"
    if fresh or not started.is_file() or json.loads(started.read_text())["key"] != stage.key:
        shutil.rmtree(stage.dir, ignore_errors=True)
    stage.dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps({"key": stage.key}))
    start = time.time()
    with Bar(stage.name, total, unit) as bar:
        result = work(stage, bar)
    result["seconds"] = round(time.time() - start, 1)
    return stage.finish(result)


class Bar:
    """A tqdm bar per stage (plain lines when stderr is not a terminal)."""

    def __init__(self, name: str, total: int, unit: str):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=f"{name:>10}", unit=unit, dynamic_ncols=True,
                         mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set(self, n: int) -> None:
        self._bar.update(n - self._bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._bar.close()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(cmd: list[str], log: Path, on_line: Optional[Callable[[str], None]] = None,
         threads: Optional[int] = None) -> None:
    """Run one of the project's CLIs, its output to `log`; an error shows the log's tail."""
    env = _env()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in that process
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=REPO)
        for line in proc.stdout:
            out.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {code}); see {log}:\n{tail}")


def pair_accuracy(outcomes) -> dict[str, dict]:
    """{"A vs B": {"count", "accuracy"}}: discrimination outcomes by (reference policy,
    rejected policy), ties counting 1/2 as in the totals."""
    pairs: dict[str, list[float]] = {}
    for o in outcomes:
        pairs.setdefault(f"{o.policy} vs {o.rejected_policy}", []).append(o.credit)
    return {k: {"count": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(pairs.items())}


def _write_jsonl(path: Path, records) -> int:
    n = 0
    with atomic_file(path) as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
            n += 1
    return n


def _read_jsonl(pattern_dir: Path, glob: str = "*/*.jsonl") -> list[dict]:
    out = []
    for path in sorted(pattern_dir.glob(glob)):
        with open(path, encoding="utf-8") as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


# ---- the pipeline ------------------------------------------------------------------------------

class DemoPipeline:
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

    # 1. corpus and tokenizer
    def corpus(self) -> dict:
        from megatron_polar.demo.corpus import write_corpus

        def work(stage, bar):
            result = write_corpus(stage.dir, self.cfg.corpus_sources)
            bar.update(1)
            return result
        return run_stage(self.stage("corpus", "corpus_sources"), work, 1, "step")

    def tokenizer(self) -> dict:
        from megatron_polar.demo.corpus import read_corpus
        from megatron_polar.demo.tokenizer import train_tokenizer

        def work(stage, bar):
            texts = [t for kind in KINDS
                     for t in read_corpus(self.work / "corpus" / f"{kind}.jsonl")]
            train_tokenizer(texts, stage.dir, self.cfg.vocab_size)
            bar.update(1)
            return {"vocab_size": self.cfg.vocab_size}
        return run_stage(self.stage("tokenizer", "vocab_size"), work, 1, "step")

    # 2. the policy pool and the base LM the reward model starts from (the paper initialises
    # the RM from the base LLM), trained side by side in worker processes (workers.py)
    def seeded(self, run: PolicyRun) -> PolicyRun:
        """`run` with its seed drawn from the demo's seed and its own."""
        return replace(run, seed=self.cfg.seed * 100 + run.seed)

    def base_run(self) -> PolicyRun:
        from megatron_polar.demo.policies import PolicyShape

        shape = self.cfg.rm_shape
        return self.seeded(PolicyRun(
            "base", {"prose": 0.5, "code": 0.25, "cpp": 0.25},
            (self.cfg.base_steps,), seed=4,
            shape=PolicyShape(
                hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                num_heads=shape["num_attention_heads"], num_kv_heads=shape["num_query_groups"],
                ffn_hidden_size=shape["ffn_hidden_size"],
                max_position_embeddings=shape["max_position_embeddings"])))

    def pool_and_base(self) -> tuple[dict, dict]:
        from megatron_polar.demo.workers import run_jobs, train_run_job

        cfg = self.cfg
        pool = self.stage("pool", "vocab_size", "runs", "held_out", "seed")
        base = self.stage("base", "vocab_size", "rm_shape", "base_steps", "seed",
                          after=("tokenizer",))
        found = {"pool": pool.done(), "base": base.done()}
        todo = [s for s in (pool, base) if found[s.name] is None]
        for s in (pool, base):
            if found[s.name] is not None:
                print(f"[{s.name}] reused ({s.dir})")
        if not todo:
            return found["pool"], found["base"]
        runs = {"pool": [self.seeded(run) for run in cfg.runs], "base": [self.base_run()]}
        jobs, owners = [], []
        for s in todo:
            shutil.rmtree(s.dir, ignore_errors=True)
            s.dir.mkdir(parents=True)
            for run in runs[s.name]:
                # The base LM's steps cost about as much as a policy's (4 narrow layers vs 3).
                jobs.append((train_run_job, (run, str(self.work / "corpus"),
                                             str(self.work / "tokenizer"), str(s.dir))))
                owners.append(s.name)
        order = sorted(range(len(jobs)), key=lambda i: -jobs[i][1][0].save_at[-1])
        start = time.time()
        name = "+".join(s.name for s in todo)
        total = sum(run.save_at[-1] for s in todo for run in runs[s.name])
        with Bar(name, total, "step") as bar:
            done = run_jobs([jobs[i] for i in order], cfg.workers, cfg.threads, bar.update)
        saved = {owners[i]: [] for i in order}
        for i, paths in zip(order, done):
            saved[owners[i]] += paths
        seconds = round(time.time() - start, 1)
        if pool in todo:
            names = [p for run in cfg.runs for p in run.policy_names()]
            (pool.dir / "pool.txt").write_text(
                "# NAME PATH: the demo's policies (held out from training: "
                + ", ".join(cfg.held_out) + ")\n" + "".join(f"{n} {n}\n" for n in names))
            found["pool"] = pool.finish({"policies": names, "held_out": list(cfg.held_out),
                                         "seconds": seconds, "parallel_with": name})
        if base in todo:
            from megatron_polar.convert.importer import import_hf
            from megatron_polar.demo.base_model import llama_to_internlm2

            (llama,) = saved["base"]
            hf = llama_to_internlm2(Path(llama), base.dir / "internlm2", self.rm_preset_object())
            import_hf(hf, base.dir / "ckpt", reward_token_id=4, tokenizer=self.work / "tokenizer")
            found["base"] = base.finish({"steps": cfg.base_steps, "seconds": seconds,
                                         "parallel_with": name})
        return found["pool"], found["base"]

    # 3. sampling
    def shards(self, policy: str) -> list[int]:
        """The sampling shards `policy` samples. Prompt i is in shard i % num_shards, with
        num_shards = eval_every * preference_every: shards s with s % eval_every == 0 hold the
        evaluation prompts, shard 0 the evaluation prompts of the preference protocol. The
        held-out policies answer the evaluation prompts only, the training policies the
        training prompts and shard 0 (the preference protocol ranks three checkpoints of a run,
        so it needs the training policies' answers too)."""
        every = self.cfg.eval_every
        count = every * self.cfg.preference_every
        if policy in self.cfg.held_out:
            return list(range(0, count, every))
        return [s for s in range(count) if s == 0 or s % every]

    def sampling(self) -> dict:
        from megatron_polar.generation.sampler import SamplingConfig, run_sampling
        from megatron_polar.demo.workers import run_jobs, sample_job

        cfg = self.cfg
        names = [p for run in cfg.runs for p in run.policy_names()]
        count = cfg.eval_every * cfg.preference_every

        def work(stage, bar):
            common = dict(
                policies=str(self.work / "pool" / "pool.txt"), output=str(stage.dir),
                corpus=tuple(str(self.work / "corpus" / f"{kind}.jsonl") for kind in KINDS),
                num_prompts=cfg.num_prompts, max_prefix_tokens=cfg.max_prefix_tokens,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                batch_size=cfg.sampling_batch_size, backend="transformers", num_shards=count)
            run_sampling(SamplingConfig(**common, prompts_only=True))  # one prompt set for all
            # One job per policy (the training policies' first: they have the most prompts).
            jobs = [(sample_job, ({**common, "policy": (name,)}, self.shards(name)))
                    for name in sorted(names, key=lambda n: n in cfg.held_out)]
            summaries = run_jobs(jobs, cfg.workers, cfg.threads, bar.update)
            total = {k: sum(s[k] for s in summaries) for k in ("written", "skipped", "tokens",
                                                                 "empty")}
            return {"trajectories": total["written"] + total["skipped"],
                    "tokens_generated": total["tokens"],
                    "truncated": {k: sum(s["truncated"][k] for s in summaries)
                                  for k in ("loop", "tail")},
                    "empty": total["empty"]}
        # Resumable: a killed sampling stage continues where it stopped.
        total = 2 * sum(len(range(s, cfg.num_prompts, count))
                        for name in names for s in self.shards(name))
        return run_stage(self.stage("sampling", "num_prompts", "max_prefix_tokens",
                                    "max_new_tokens", "eval_every", "preference_every",
                                    "sampling_batch_size", after=("pool",)),
                         work, total, "traj", fresh=False)

    # 4. datasets: pre-training triplets, held-out trajectories, ranked SFT and eval sets
    def is_eval_prompt(self, prompt_id: str) -> bool:
        return int(prompt_id.lstrip("ci")) % self.cfg.eval_every == 0

    def datasets(self) -> dict:
        from megatron_polar.data.build import BuildConfig, build_triplets

        cfg = self.cfg

        def work(stage, bar):
            trajectories = _read_jsonl(self.work / "sampling")
            train_policies, held = set(cfg.training_policies()), set(cfg.held_out)
            pre = [t for t in trajectories
                   if t["policy"] in train_policies and not self.is_eval_prompt(t["prompt_id"])]
            heldout = [t for t in trajectories
                       if t["policy"] in held and self.is_eval_prompt(t["prompt_id"])]
            n_pre = _write_jsonl(stage.dir / "pretrain_trajectories.jsonl", pre)
            n_held = _write_jsonl(stage.dir / "heldout_trajectories.jsonl", heldout)
            sft = self.ranked(trajectories, eval_prompts=False, policies=train_policies)
            ranked_eval = self.ranked(trajectories, eval_prompts=True, policies=None)
            _write_jsonl(stage.dir / "sft_ranked.jsonl", sft)
            _write_jsonl(stage.dir / "eval_ranked.jsonl", ranked_eval)
            bar.update(1)
            results = {"pretrain_trajectories": n_pre, "heldout_trajectories": n_held,
                       "sft_rankings": len(sft), "eval_rankings": len(ranked_eval)}
            for name, mode, source in (
                    ("pretrain", "from_trajectories", "pretrain_trajectories.jsonl"),
                    ("heldout", "from_trajectories", "heldout_trajectories.jsonl"),
                    ("sft", "from_rankings", "sft_ranked.jsonl")):
                # tools/build_triplets.py's library. skip_bad: two identical short
                # trajectories make a triplet the build refuses (reference == rejected); they
                # go to PREFIX.rejected.jsonl.
                summary = build_triplets(BuildConfig(
                    inputs=[str(stage.dir / source)], output_prefix=str(stage.dir / name),
                    tokenizer=str(self.work / "tokenizer"), max_length=cfg.max_length,
                    skip_bad=True, seed=cfg.seed, **{mode: True}), progress=False)
                results[f"{name}_triplets"] = summary.triplets
                results[f"{name}_tokens"] = summary.tokens
                bar.update(1)
            return results
        return run_stage(self.stage("datasets", "held_out", "max_length"), work, 4, "step")

    def ranked(self, trajectories: list[dict], eval_prompts: bool,
               policies: Optional[set]) -> list[dict]:
        """Ranked sets standing in for human rankings: within one run, a later checkpoint's
        answer ranks above an earlier one's (it writes better text). Three checkpoints of a run
        per prompt (chosen with a seeded generator), best first; category = the run."""
        rng = random.Random(self.cfg.seed)
        by_prompt: dict[str, dict] = {}
        for t in trajectories:
            if self.is_eval_prompt(t["prompt_id"]) != eval_prompts or t["sample_index"] != 0:
                continue
            if policies is not None and t["policy"] not in policies:
                continue
            by_prompt.setdefault(t["prompt_id"], {})[t["policy"]] = t
        out = []
        for prompt_id in sorted(by_prompt):
            answers = by_prompt[prompt_id]
            for run in self.cfg.runs:
                names = [n for n in run.policy_names() if n in answers]
                if len(names) < 3:
                    continue
                picked = sorted(rng.sample(names, 3), key=lambda n: -int(n.rsplit("-", 1)[1]))
                texts = [answers[n]["trajectory"] for n in picked]
                if len(set(texts)) < 3:
                    continue  # identical answers cannot be ranked
                out.append({"id": f"{prompt_id}/{run.name}", "prompt": answers[picked[0]]["prompt"],
                            "responses": texts, "policies": picked, "category": run.name,
                            "wrapper": "pretrain"})
        return out

    # 5. training
    def _train(self, name: str, args: list[str], iters: int, keys: tuple[str, ...],
               after: Optional[tuple[str, ...]] = None) -> dict:
        def work(stage, bar):
            log_json = stage.dir / "log.jsonl"

            def on_line(line: str):
                if line.startswith("iteration"):
                    bar.set(int(line.split()[1].split("/")[0]))
            _run([self.py, "-m", "megatron_polar.train", *args, "--save", str(stage.dir / "ckpt"),
                  "--log-json", str(log_json), "--log-interval", "10"],
                 stage.dir / "train.log", on_line, threads=self.cfg.train_threads)
            records = [json.loads(line) for line in open(log_json)]
            return {"log": [r for r in records if r.get("kind") in ("train", "valid")]}
        return run_stage(self.stage(name, *keys, after=after), work, iters, "it", fresh=False)

    def rm_preset_object(self):
        from megatron_polar.model.presets import get_preset

        from megatron_polar.data.tokenizer import PolarTokenizer

        # The trained tokenizer's size (BPE may stop short of the vocab_size asked for).
        vocab = PolarTokenizer(self.work / "tokenizer").vocab_size
        return get_preset("tiny").replace(name="demo", vocab_size=vocab,
                                          reward_token_id=4, **self.cfg.rm_shape)

    def rm_preset(self) -> Path:
        """The preset the base model was imported with (`model.json` of its checkpoint)."""
        return self.work / "base" / "ckpt"

    def pretrain(self) -> dict:
        cfg, data = self.cfg, self.work / "datasets"
        return self._train("pretrain", [
            "--stage", "pretrain", "--model-preset", str(self.rm_preset()),
            "--pretrained-checkpoint", str(self.work / "base" / "ckpt"),
            "--data-path", str(data / "pretrain"), "--valid-data-path", str(data / "heldout"),
            "--tokenizer", str(self.work / "tokenizer"), "--seed", str(cfg.seed),
            "--micro-batch-tokens", str(cfg.micro_batch_tokens),
            "--global-batch-size", str(cfg.global_batch_size), "--lr", str(cfg.pretrain_lr),
            "--train-iters", str(cfg.pretrain_iters), "--eval-interval", "50",
            "--eval-iters", "8", "--save-interval", "150"], cfg.pretrain_iters,
            ("pretrain_iters", "pretrain_lr", "global_batch_size", "micro_batch_tokens",
             "train_threads"), after=("datasets", "base"))

    def sft(self) -> dict:
        cfg, data = self.cfg, self.work / "datasets"
        return self._train("sft", [
            "--stage", "sft", "--pretrained-checkpoint", str(self.work / "pretrain" / "ckpt"),
            "--data-path", str(data / "sft"), "--tokenizer", str(self.work / "tokenizer"),
            "--seed", str(cfg.seed), "--micro-batch-tokens", str(cfg.micro_batch_tokens),
            "--global-batch-size", str(cfg.global_batch_size), "--lr", str(cfg.sft_lr),
            "--train-iters", str(cfg.sft_iters), "--save-interval", str(cfg.sft_iters)],
            cfg.sft_iters, ("sft_iters", "sft_lr"))

    # 6. evaluation
    def evaluate(self) -> dict:
        from megatron_polar.data.encoding import EncodingConfig
        from megatron_polar.eval.discrimination import (evaluate_discrimination,
                                                        load_policy_triplets)
        from megatron_polar.eval.preference import evaluate_preference, read_ranked
        from megatron_polar.eval.scorer import RewardScorer

        data = self.work / "datasets"

        def work(stage, bar):
            triplets = load_policy_triplets([str(data / "heldout_trajectories.jsonl")],
                                            seed=self.cfg.seed)
            ranked = read_ranked([str(data / "eval_ranked.jsonl")])
            encoding = {"encoding": EncodingConfig(max_length=self.cfg.max_length)}
            models = {
                # The base LM with the import's zero head: every reward ties (chance).
                "initial": lambda: RewardScorer.from_checkpoint(
                    str(self.work / "base" / "ckpt"), **encoding),
                "pretrained": lambda: RewardScorer.from_checkpoint(
                    str(self.work / "pretrain" / "ckpt"), **encoding),
                "sft": lambda: RewardScorer.from_checkpoint(str(self.work / "sft" / "ckpt"),
                                                     **encoding),
            }
            results = {}
            for name, load in models.items():
                scorer = load()
                disc = evaluate_discrimination(triplets, scorer)
                pref = evaluate_preference(ranked, scorer)
                # Per-triplet outcomes stay out of the report: totals and per-policy/category.
                results[name] = {kind: {k: v for k, v in report.as_dict().items()
                                        if k not in ("triplets", "outcomes", "records")}
                                 for kind, report in (("discrimination", disc),
                                                      ("preference", pref))}
                results[name]["discrimination"]["pairs"] = pair_accuracy(disc.outcomes)
                bar.update(1)
            results["heldout_triplets"] = len(triplets.triplets)
            results["eval_rankings"] = len(ranked)
            return results
        return run_stage(self.stage("evaluate"),
                         work, 3, "model")

    # 7. export and scoring with the exported model
    def export_and_score(self) -> dict:
        def work(stage, bar):
            hf = stage.dir / "hf"
            _run([self.py, "tools/convert_hf.py", "export", "--ckpt",
                  str(self.work / "sft" / "ckpt"), "--out", str(hf)], stage.dir / "export.log")
            bar.update(1)
            examples = self.score_examples()
            inputs = stage.dir / "examples.jsonl"
            _write_jsonl(inputs, examples)
            rewards_file = stage.dir / "rewards.jsonl"
            _run([self.py, "-m", "megatron_polar.score", "--hf", str(hf), "--input", str(inputs),
                  "--output", str(rewards_file), "--max-length", str(self.cfg.max_length)],
                 stage.dir / "score.log")
            rewards = [json.loads(line)["reward"] for line in open(rewards_file)]
            bar.update(1)
            scored = [{**e, "reward": r} for e, r in zip(examples, rewards)]
            return {"hf_dir": str(hf), "files": sorted(p.name for p in hf.iterdir()),
                    "examples": scored, "reward_table": self.reward_table(scored)}
        return run_stage(self.stage("export"),
                         work, 2, "step")

    def score_examples(self, prompts: int = 20) -> list[dict]:
        """The first `prompts` held-out prompts that have two answers of every held-out policy:
        on each, every held-out policy's first answer is a reference, scored against its own
        second answer and the other policies' first answers."""
        trajectories = [json.loads(line) for line in
                        open(self.work / "datasets" / "heldout_trajectories.jsonl")]
        by_prompt: dict[str, dict] = {}
        for t in trajectories:
            by_prompt.setdefault(t["prompt_id"], {}).setdefault(t["policy"], []).append(t)
        out = []
        for prompt_id in sorted(by_prompt):
            answers = by_prompt[prompt_id]
            if not all(len(answers.get(p, [])) >= 2 for p in self.cfg.held_out):
                continue
            for ref_policy in self.cfg.held_out:
                ref = answers[ref_policy][0]
                for cand_policy in self.cfg.held_out:
                    cand = answers[cand_policy][1 if cand_policy == ref_policy else 0]
                    out.append({"id": f"{prompt_id}/{ref_policy}/{cand_policy}",
                                "prompt": ref["prompt"], "reference": ref["trajectory"],
                                "candidate": cand["trajectory"], "wrapper": "pretrain"})
            if len(out) == prompts * len(self.cfg.held_out) ** 2:
                return out
        if not out:
            raise RuntimeError("no held-out prompt has two answers of every held-out policy")
        return out

    @staticmethod
    def reward_table(examples: list[dict]) -> dict:
        """{reference policy: {candidate policy: mean reward, "same first": share of prompts
        where the reference's own policy got the highest reward}} from scored examples."""
        rewards: dict = {}
        for e in examples:
            prompt_id, ref, cand = e["id"].split("/")
            rewards.setdefault(ref, {}).setdefault(prompt_id, {})[cand] = e["reward"]
        table = {}
        for ref, per_prompt in rewards.items():
            cands = sorted({c for r in per_prompt.values() for c in r})
            row = {c: sum(r[c] for r in per_prompt.values()) / len(per_prompt) for c in cands}
            row["same first"] = sum(max(r, key=r.get) == ref
                                    for r in per_prompt.values()) / len(per_prompt)
            row["prompts"] = len(per_prompt)
            table[ref] = row
        return table

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
