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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from megatron_polar.data.records import atomic_file
from megatron_polar.demo.policies import PolicyRun

REPO = Path(__file__).resolve().parents[2]


@dataclass
class DemoConfig:
    """Everything the demo does, as data. Defaults fit in ~10 minutes on 2 CPU cores."""

    workdir: str = "runs/demo"
    seed: int = 1234
    vocab_size: int = 2048
    # The pool: checkpoints of a prose run, a code run and a mixed run (13 policies).
    runs: tuple[PolicyRun, ...] = (
        PolicyRun("prose", {"prose": 1.0}, (25, 50, 100, 150, 250, 400, 600), seed=1),
        PolicyRun("code", {"code": 1.0}, (50, 150, 300), seed=2),
        PolicyRun("mixed", {"prose": 0.5, "code": 0.5}, (100, 200, 300), seed=3),
    )
    # Never trained on: the evaluation's policies (one of each run, early to late).
    held_out: tuple[str, ...] = ("prose-100", "code-150", "mixed-300")
    # Prompts: corpus prefixes; every 7th prompt is kept for evaluation only.
    num_prompts: int = 1500
    eval_every: int = 7
    max_prefix_tokens: int = 16
    max_new_tokens: int = 48
    sampling_batch_size: int = 64
    # The reward model: the tiny preset's shape with the demo vocabulary.
    rm_shape: dict = field(default_factory=lambda: dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=176, max_position_embeddings=1024))
    max_length: int = 1024
    base_steps: int = 800
    pretrain_iters: int = 700
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


def _run(cmd: list[str], log: Path, on_line: Optional[Callable[[str], None]] = None) -> None:
    """Run one of the project's CLIs, its output to `log`; an error shows the log's tail."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(), cwd=REPO)
        for line in proc.stdout:
            out.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {code}); see {log}:\n{tail}")


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

    def stage(self, name: str, *settings: str) -> Stage:
        """The next stage. The pipeline is a chain, so a stage's key covers its own settings
        and the key of the stage before it: anything redone upstream is redone downstream."""
        key = hashlib.sha256(f"{self._last_key}/{self.cfg.key(*settings)}".encode()).hexdigest()
        self._last_key = key[:16]
        return Stage(self.work, name, self._last_key)

    # 1. corpus and tokenizer
    def corpus(self) -> dict:
        from megatron_polar.demo.corpus import write_corpus

        def work(stage, bar):
            sizes = write_corpus(stage.dir)
            bar.update(1)
            return {"characters": sizes}
        return run_stage(self.stage("corpus"), work, 1, "step")

    def tokenizer(self) -> dict:
        from megatron_polar.demo.corpus import read_corpus
        from megatron_polar.demo.tokenizer import train_tokenizer

        def work(stage, bar):
            texts = [t for kind in ("prose", "code")
                     for t in read_corpus(self.work / "corpus" / f"{kind}.jsonl")]
            train_tokenizer(texts, stage.dir, self.cfg.vocab_size)
            bar.update(1)
            return {"vocab_size": self.cfg.vocab_size}
        return run_stage(self.stage("tokenizer", "vocab_size"), work, 1, "step")

    # 2. the policy pool
    def pool(self) -> dict:
        from megatron_polar.demo.corpus import read_corpus
        from megatron_polar.demo.policies import train_policy_run

        def work(stage, bar):
            corpora = {k: read_corpus(self.work / "corpus" / f"{k}.jsonl")
                       for k in ("prose", "code")}
            for run in self.cfg.runs:
                train_policy_run(run, corpora, self.work / "tokenizer", stage.dir, bar.update)
            names = [p for run in self.cfg.runs for p in run.policy_names()]
            (stage.dir / "pool.txt").write_text(
                "# NAME PATH: the demo's policies (held out from training: "
                + ", ".join(self.cfg.held_out) + ")\n"
                + "".join(f"{n} {n}\n" for n in names))
            return {"policies": names, "held_out": list(self.cfg.held_out)}
        total = sum(run.save_at[-1] for run in self.cfg.runs)
        return run_stage(self.stage("pool", "vocab_size", "runs", "held_out"), work, total,
                         "step")

    # 2b. the base LM the reward model starts from (the paper initialises from the base LLM)
    def base_model(self) -> dict:
        from megatron_polar.convert.importer import import_hf
        from megatron_polar.demo.base_model import llama_to_internlm2
        from megatron_polar.demo.corpus import read_corpus
        from megatron_polar.demo.policies import PolicyShape, train_policy_run

        cfg = self.cfg
        shape = cfg.rm_shape
        run = PolicyRun("base", {"prose": 0.5, "code": 0.5}, (cfg.base_steps,), seed=4,
                        shape=PolicyShape(
                            hidden_size=shape["hidden_size"], num_layers=shape["num_layers"],
                            num_heads=shape["num_attention_heads"],
                            num_kv_heads=shape["num_query_groups"],
                            ffn_hidden_size=shape["ffn_hidden_size"],
                            max_position_embeddings=shape["max_position_embeddings"]))

        def work(stage, bar):
            corpora = {k: read_corpus(self.work / "corpus" / f"{k}.jsonl")
                       for k in ("prose", "code")}
            (llama,) = train_policy_run(run, corpora, self.work / "tokenizer", stage.dir,
                                        bar.update)
            hf = llama_to_internlm2(llama, stage.dir / "internlm2", self.rm_preset_object())
            import_hf(hf, stage.dir / "ckpt", reward_token_id=4,
                      tokenizer=self.work / "tokenizer")
            return {"steps": cfg.base_steps}
        return run_stage(self.stage("base", "rm_shape", "base_steps"), work, cfg.base_steps,
                         "step")

    # 3. sampling
    def sampling(self) -> dict:
        from megatron_polar.generation.sampler import SamplingConfig, run_sampling

        cfg = self.cfg
        n_policies = sum(len(run.save_at) for run in cfg.runs)

        def work(stage, bar):
            sampling = SamplingConfig(
                policies=str(self.work / "pool" / "pool.txt"), output=str(stage.dir),
                corpus=(str(self.work / "corpus" / "prose.jsonl"),
                        str(self.work / "corpus" / "code.jsonl")),
                num_prompts=cfg.num_prompts, max_prefix_tokens=cfg.max_prefix_tokens,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                batch_size=cfg.sampling_batch_size, backend="transformers")
            summary = run_sampling(sampling, progress=bar.update)
            return {"trajectories": summary.written + summary.skipped,
                    "tokens_generated": summary.tokens, "truncated": summary.truncated,
                    "empty": summary.empty}
        # Resumable: a killed sampling stage continues where it stopped.
        return run_stage(self.stage("sampling", "vocab_size", "runs", "num_prompts", "seed",
                                    "max_prefix_tokens", "max_new_tokens"),
                         work, cfg.num_prompts * 2 * n_policies, "traj", fresh=False)

    # 4. datasets: pre-training triplets, held-out trajectories, ranked SFT and eval sets
    def is_eval_prompt(self, prompt_id: str) -> bool:
        return int(prompt_id.lstrip("ci")) % self.cfg.eval_every == 0

    def datasets(self) -> dict:
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
            tok = str(self.work / "tokenizer")
            for name, flag, source in (
                    ("pretrain", "--from-trajectories", "pretrain_trajectories.jsonl"),
                    ("heldout", "--from-trajectories", "heldout_trajectories.jsonl"),
                    ("sft", "--from-rankings", "sft_ranked.jsonl")):
                # --skip-bad: two identical short trajectories make a triplet the build
                # refuses (reference == rejected); they go to PREFIX.rejected.jsonl.
                _run([self.py, "tools/build_triplets.py", flag, "--input",
                      str(stage.dir / source), "--output-prefix", str(stage.dir / name),
                      "--tokenizer", tok, "--max-length", str(cfg.max_length), "--skip-bad",
                      "--quiet"], stage.dir / f"build_{name}.log")
                meta = json.loads((stage.dir / f"{name}.meta.json").read_text())
                results[f"{name}_triplets"] = meta["triplets"]
                results[f"{name}_tokens"] = meta["tokens"]
                bar.update(1)
            return results
        return run_stage(self.stage("datasets", "vocab_size", "runs", "held_out", "num_prompts",
                                    "seed", "max_prefix_tokens", "max_new_tokens", "eval_every",
                                    "max_length"), work, 4, "step")

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
    def _train(self, name: str, args: list[str], iters: int, keys: tuple[str, ...]) -> dict:
        def work(stage, bar):
            log_json = stage.dir / "log.jsonl"

            def on_line(line: str):
                if line.startswith("iteration"):
                    bar.set(int(line.split()[1].split("/")[0]))
            _run([self.py, "-m", "megatron_polar.train", *args, "--save", str(stage.dir / "ckpt"),
                  "--log-json", str(log_json), "--log-interval", "10"],
                 stage.dir / "train.log", on_line)
            records = [json.loads(line) for line in open(log_json)]
            return {"log": [r for r in records if r.get("kind") in ("train", "valid")]}
        return run_stage(self.stage(name, *keys), work, iters, "it", fresh=False)

    def _train_keys(self) -> tuple[str, ...]:
        return ("vocab_size", "runs", "held_out", "num_prompts", "seed", "max_prefix_tokens",
                "max_new_tokens", "eval_every", "max_length", "rm_shape", "pretrain_iters",
                "pretrain_lr", "global_batch_size", "micro_batch_tokens")

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
            self._train_keys())

    def sft(self) -> dict:
        cfg, data = self.cfg, self.work / "datasets"
        return self._train("sft", [
            "--stage", "sft", "--pretrained-checkpoint", str(self.work / "pretrain" / "ckpt"),
            "--data-path", str(data / "sft"), "--tokenizer", str(self.work / "tokenizer"),
            "--seed", str(cfg.seed), "--micro-batch-tokens", str(cfg.micro_batch_tokens),
            "--global-batch-size", str(cfg.global_batch_size), "--lr", str(cfg.sft_lr),
            "--train-iters", str(cfg.sft_iters), "--save-interval", str(cfg.sft_iters)],
            cfg.sft_iters, self._train_keys() + ("sft_iters", "sft_lr"))

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
                bar.update(1)
            results["heldout_triplets"] = len(triplets.triplets)
            results["eval_rankings"] = len(ranked)
            return results
        return run_stage(self.stage("evaluate", *self._train_keys(), "sft_iters", "sft_lr"),
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
            return {"hf_dir": str(hf), "files": sorted(p.name for p in hf.iterdir()),
                    "examples": [{**e, "reward": r} for e, r in zip(examples, rewards)]}
        return run_stage(self.stage("export", *self._train_keys(), "sft_iters", "sft_lr"),
                         work, 2, "step")

    def score_examples(self) -> list[dict]:
        """One held-out prompt: a reference from the strongest held-out policy, candidates from
        the same policy and from the others."""
        trajectories = [json.loads(line) for line in
                        open(self.work / "datasets" / "heldout_trajectories.jsonl")]
        by_prompt: dict[str, dict] = {}
        for t in trajectories:
            by_prompt.setdefault(t["prompt_id"], {}).setdefault(t["policy"], []).append(t)
        target = self.cfg.held_out[-1]
        for prompt_id in sorted(by_prompt):
            answers = by_prompt[prompt_id]
            if all(len(answers.get(p, [])) >= 2 for p in self.cfg.held_out):
                ref = answers[target][0]
                candidates = [(f"{target} (same policy)", answers[target][1])] + [
                    (other, answers[other][0]) for other in self.cfg.held_out if other != target]
                out = [{"id": name, "prompt": ref["prompt"], "reference": ref["trajectory"],
                        "candidate": cand["trajectory"], "wrapper": "pretrain"}
                       for name, cand in candidates]
                return out
        raise RuntimeError("no held-out prompt has two answers of every held-out policy")

    def run(self) -> dict:
        start = time.time()
        report = {"corpus": self.corpus(), "tokenizer": self.tokenizer(), "pool": self.pool(),
                  "sampling": self.sampling(), "datasets": self.datasets(),
                  "base": self.base_model()}
        report["pretrain"] = self.pretrain()
        report["sft"] = self.sft()
        report["evaluate"] = self.evaluate()
        report["export"] = self.export_and_score()
        report["wall_seconds"] = round(time.time() - start, 1)
        return report
