"""Policy-discrimination accuracy on held-out policies: the pre-training task, measured.

Input: trajectory JSONL (`prompt_id`, `prompt`, `policy`, `trajectory`, optional `wrapper`),
as `tools/build_triplets.py --from-trajectories` reads it. Only the chosen policies' lines are
kept (all by default), and triplets are assembled from them exactly as pre-training assembles
them (`assemble_from_trajectories`, same seed semantics): for a prompt and a policy A with two
or more trajectories, reference and chosen are two of A's, the rejected one is another kept
policy's. The reward model is right when

    r(p, reference, chosen) > r(p, reference, rejected)        (a tie counts 1/2)

Accuracy is reported overall and per reference policy (A), with counts. A bad line is an error
naming its file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from megatron_polar.data.assembly import assemble_from_trajectories
from megatron_polar.data.encoding import RecordError
from megatron_polar.data.records import (TRAJECTORY_FIELDS, expand_inputs, iter_lines,
                                         parse_json_object)
from megatron_polar.eval.preference import (Accuracy, EvalInputError, ScoreFn, grouped_table,
                                            macro_mean)
from megatron_polar.eval.scorer import ScoreRecord


@dataclass(frozen=True)
class PolicyTriplet:
    where: str  # the three lines: reference+chosen+rejected
    prompt: Any
    reference: str
    chosen: str
    rejected: str
    wrapper: str
    policy: str  # of the reference and the chosen trajectory
    rejected_policy: str


@dataclass
class TripletSet:
    triplets: list[PolicyTriplet]
    files: list[str]
    policies: list[str]  # the policies kept
    seed: int
    trajectories_read: int = 0
    trajectories_kept: int = 0  # of the kept policies
    trajectories_used: int = 0  # in at least one assembled triplet
    triplets_assembled: int = 0  # before max_triplets

    def counts(self) -> dict:
        return {"trajectories_read": self.trajectories_read,
                "trajectories_kept": self.trajectories_kept,
                "trajectories_used": self.trajectories_used,
                "triplets_assembled": self.triplets_assembled,
                "triplets_scored": len(self.triplets)}


def load_policy_triplets(patterns: Sequence[str], policies: Optional[Sequence[str]] = None,
                         seed: int = 1234, max_triplets: Optional[int] = None) -> TripletSet:
    """Triplets of the given policies (None: every policy present), assembled with `seed`;
    at most `max_triplets` of them, drawn with `seed` and kept in assembly order."""
    if max_triplets is not None and max_triplets < 1:
        raise ValueError("max_triplets must be >= 1")
    try:
        files = expand_inputs(list(patterns))
    except FileNotFoundError as e:
        raise EvalInputError(str(e)) from None
    wanted = None if policies is None else {str(p) for p in policies}
    lines, kept, policy_of, present = 0, [], {}, set()
    for line in iter_lines(files):
        lines += 1
        try:
            rec = parse_json_object(line.raw, TRAJECTORY_FIELDS)
        except RecordError as e:
            raise EvalInputError(f"{line.where}: {e}") from None
        name = rec["policy"]
        valid = isinstance(name, (str, int)) and not isinstance(name, bool)
        # A line with an ill-typed policy goes on to the assembler, which rejects it with its
        # reason (below); one of a policy not asked for is left out.
        if valid:
            present.add(str(name))
            policy_of[line.where] = str(name)
        if wanted is None or not valid or str(name) in wanted:
            kept.append(line)
    if wanted is not None and wanted - present:
        raise EvalInputError(f"policies not found in {', '.join(files)}: "
                             f"{', '.join(sorted(wanted - present))} (present: "
                             f"{', '.join(sorted(present))})")

    assembly = assemble_from_trajectories(kept, seed)
    if assembly.rejected:
        where, reason, _ = assembly.rejected[0]
        more = (f" (and {len(assembly.rejected) - 1} more bad lines)"
                if len(assembly.rejected) > 1 else "")
        raise EvalInputError(f"{where}: {reason}{more}")
    # A triplet's policies come from the lines it was assembled from, not from its joined
    # `where` (a path may hold "+").
    triplets = [PolicyTriplet(t.where, r["prompt"], r["reference"], r["chosen"], r["rejected"],
                              r["wrapper"], policy_of[t.origins[0]], policy_of[t.origins[2]])
                for t in assembly.triplets for r in (t.record,)]
    if not triplets:
        raise EvalInputError(f"no triplets from {', '.join(files)}: a triplet needs a prompt "
                             "with two trajectories of one kept policy and one of another")
    data = TripletSet(triplets, files, sorted(wanted if wanted is not None else present), seed,
                      trajectories_read=lines, trajectories_kept=len(kept),
                      trajectories_used=len(assembly.used), triplets_assembled=len(triplets))
    if max_triplets is not None and len(triplets) > max_triplets:
        pick = np.random.default_rng(seed).choice(len(triplets), max_triplets, replace=False)
        data.triplets = [triplets[i] for i in sorted(pick)]
    return data


@dataclass
class DiscriminationOutcome:
    where: str
    policy: str
    rejected_policy: str
    chosen_reward: float
    rejected_reward: float
    credit: float


@dataclass
class DiscriminationReport:
    overall: Accuracy
    policies: dict[str, Accuracy]  # per reference policy, sorted by name
    data: TripletSet
    outcomes: list[DiscriminationOutcome] = field(default_factory=list)

    @property
    def macro_accuracy(self) -> Optional[float]:
        return macro_mean(self.policies)

    def as_dict(self) -> dict:
        return {"protocol": "reference and chosen from one policy, rejected from another; "
                            "correct if r(chosen) > r(rejected); ties count 1/2",
                "files": self.data.files, "policies_evaluated": self.data.policies,
                "seed": self.data.seed, **self.data.counts(),
                "overall": self.overall.as_dict(), "macro_accuracy": self.macro_accuracy,
                "policies": {n: a.as_dict() for n, a in self.policies.items()},
                "triplets": [vars(o) for o in self.outcomes]}

    def table(self) -> str:
        d = self.data
        return (grouped_table("policy discrimination accuracy (per reference policy)", "policy",
                              self.policies, self.overall, self.macro_accuracy,
                              "mean over policies")
                + f"\n  {len(d.triplets)} of {d.triplets_assembled} triplets (seed {d.seed}) "
                  f"from {d.trajectories_kept} of {d.trajectories_read} trajectories, "
                  f"policies {', '.join(d.policies)}")


def evaluate_discrimination(data: TripletSet, score_fn: ScoreFn) -> DiscriminationReport:
    """Score s+ = (p, ref, chosen) and s- = (p, ref, rejected) of every triplet, in one call."""
    batch = []
    for t in data.triplets:
        for cand, part in ((t.chosen, "chosen"), (t.rejected, "rejected")):
            batch.append(ScoreRecord(t.prompt, t.reference, cand, t.wrapper,
                                     where=f"{t.where} ({part})"))
    rewards = list(score_fn(batch))
    if len(rewards) != len(batch):
        raise ValueError(f"score_fn returned {len(rewards)} rewards for {len(batch)} records")
    overall, per_policy, outcomes = Accuracy(), {}, []
    for t, chosen, rejected in zip(data.triplets, rewards[::2], rewards[1::2]):
        c = overall.add(chosen, rejected)
        per_policy.setdefault(t.policy, Accuracy()).add(chosen, rejected)
        outcomes.append(DiscriminationOutcome(t.where, t.policy, t.rejected_policy, chosen,
                                              rejected, c))
    return DiscriminationReport(overall, dict(sorted(per_policy.items())), data, outcomes)


def discrimination_accuracy(patterns: Sequence[str], score_fn: ScoreFn,
                            policies: Optional[Sequence[str]] = None, seed: int = 1234,
                            max_triplets: Optional[int] = None) -> DiscriminationReport:
    """`load_policy_triplets` then `evaluate_discrimination`."""
    return evaluate_discrimination(load_policy_triplets(patterns, policies, seed, max_triplets),
                                   score_fn)
