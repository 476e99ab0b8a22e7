"""The demo's model stages: POLAR pre-training and ranked SFT (the project's training CLI),
evaluation of the initial, pre-trained and SFT reward models, HF export and scoring with the
exported model. `ModelStages` is a part of `DemoPipeline` (pipeline.py), which provides `cfg`,
`work`, `py`, `stage()` and `datasets()`'s output files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_polar.demo.runner import run_cli, run_stage, write_jsonl


def pair_accuracy(outcomes) -> dict[str, dict]:
    """{"A vs B": {"count", "accuracy"}}: discrimination outcomes by (reference policy,
    rejected policy), ties counting 1/2 as in the totals."""
    pairs: dict[str, list[float]] = {}
    for o in outcomes:
        pairs.setdefault(f"{o.policy} vs {o.rejected_policy}", []).append(o.credit)
    return {k: {"count": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(pairs.items())}


class ModelStages:
    """Stages 5-7 of `DemoPipeline`, and the tables their reports hold."""

    # 5. training
    def _train(self, name: str, args: list[str], iters: int, keys: tuple[str, ...],
               after: Optional[tuple[str, ...]] = None) -> dict:
        def work(stage, bar):
            log_json = stage.dir / "log.jsonl"

            def on_line(line: str):
                if line.startswith("iteration"):
                    bar.set(int(line.split()[1].split("/")[0]))
            run_cli([self.py, "-m", "megatron_polar.train", *args,
                     "--save", str(stage.dir / "ckpt"),
                     "--log-json", str(log_json), "--log-interval", "10"],
                    stage.dir / "train.log", on_line, threads=self.cfg.train_threads)
            records = [json.loads(line) for line in open(log_json)]
            return {"log": [r for r in records if r.get("kind") in ("train", "valid")]}
        return run_stage(self.stage(name, *keys, after=after), work, iters, "it", fresh=False)

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
            run_cli([self.py, "tools/convert_hf.py", "export", "--ckpt",
                     str(self.work / "sft" / "ckpt"), "--out", str(hf)],
                    stage.dir / "export.log")
            bar.update(1)
            examples = self.score_examples()
            inputs = stage.dir / "examples.jsonl"
            write_jsonl(inputs, examples)
            rewards_file = stage.dir / "rewards.jsonl"
            run_cli([self.py, "-m", "megatron_polar.score", "--hf", str(hf),
                     "--input", str(inputs), "--output", str(rewards_file),
                     "--max-length", str(self.cfg.max_length)],
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

