"""The demo's data stages, from the corpus to the training and evaluation sets: corpus ->
tokenizer -> policy pool and base LM -> sampling -> datasets (pre-training triplets, held-out
trajectories, ranked SFT and evaluation sets). `DataStages` is a part of `DemoPipeline`
(pipeline.py), which provides `cfg`, `work` and `stage()`.
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from megatron_polar.demo.corpus import KINDS
from megatron_polar.demo.policies import PolicyRun
from megatron_polar.demo.runner import Bar, read_jsonl, run_stage, write_jsonl


class DataStages:
    """Stages 1-4 of `DemoPipeline`, and the settings they derive (seeds, shards, rankings)."""

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

    def rm_preset_object(self):
        from megatron_polar.model.presets import get_preset

        from megatron_polar.data.tokenizer import PolarTokenizer

        # The trained tokenizer's size (BPE may stop short of the vocab_size asked for).
        vocab = PolarTokenizer(self.work / "tokenizer").vocab_size
        return get_preset("tiny").replace(name="demo", vocab_size=vocab,
                                          reward_token_id=4, **self.cfg.rm_shape)

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
            trajectories = read_jsonl(self.work / "sampling")
            train_policies, held = set(cfg.training_policies()), set(cfg.held_out)
            pre = [t for t in trajectories
                   if t["policy"] in train_policies and not self.is_eval_prompt(t["prompt_id"])]
            heldout = [t for t in trajectories
                       if t["policy"] in held and self.is_eval_prompt(t["prompt_id"])]
            n_pre = write_jsonl(stage.dir / "pretrain_trajectories.jsonl", pre)
            n_held = write_jsonl(stage.dir / "heldout_trajectories.jsonl", heldout)
            sft = self.ranked(trajectories, eval_prompts=False, policies=train_policies)
            ranked_eval = self.ranked(trajectories, eval_prompts=True, policies=None)
            write_jsonl(stage.dir / "sft_ranked.jsonl", sft)
            write_jsonl(stage.dir / "eval_ranked.jsonl", ranked_eval)
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
