"""The paper's protocol on ranked preference sets (docs/evaluation.md, "Preference sets").

Each input line is a JSON object with `prompt` and `responses` ranked best first (the format
`tools/build_triplets.py --from-rankings` reads), an optional category field (default
`category`) and an optional `wrapper` ("sft" by default). The top-ranked response is the
reference; the reward model must prefer the 2nd-ranked over the 3rd-ranked:

    correct  <=>  r(p, responses[0], responses[1]) > r(p, responses[0], responses[2])

Responses after the 3rd are not used. A tie counts as half correct. A record with fewer than
3 responses is an error naming its file and line (as every other ill-formed line): a
benchmark's accuracy silently computed over a subset would not be comparable to the paper's.

Accuracy is reported per category, overall over records (micro) and as the mean over
categories (macro), with counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from megatron_polar.data.assembly import ranking_pairs, record_wrapper
from megatron_polar.data.encoding import RecordError
from megatron_polar.data.records import RANKING_FIELDS, expand_inputs, iter_lines, parse_json_object
from megatron_polar.eval.scorer import ScoreRecord

ScoreFn = Callable[[list[ScoreRecord]], list[float]]
UNCATEGORIZED = "uncategorized"  # the category of a record without the category field


class EvalInputError(ValueError):
    """An input that cannot be evaluated; the message names the file and line."""


def credit(chosen: float, rejected: float) -> float:
    """1 when the chosen response scores higher, 1/2 for a tie, 0 otherwise."""
    return 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0


@dataclass
class Accuracy:
    """Correct decisions out of `count`, ties counted as half correct."""

    count: int = 0
    correct: float = 0.0
    ties: int = 0

    def add(self, chosen: float, rejected: float) -> float:
        c = credit(chosen, rejected)
        self.count += 1
        self.correct += c
        self.ties += c == 0.5
        return c

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.count if self.count else None

    def as_dict(self) -> dict:
        return {"count": self.count, "correct": self.correct, "ties": self.ties,
                "accuracy": self.accuracy}


def macro_mean(groups: dict[str, Accuracy]) -> Optional[float]:
    """Mean of the groups' accuracies: each group weighs the same, whatever its size."""
    values = [g.accuracy for g in groups.values() if g.count]
    return sum(values) / len(values) if values else None


def grouped_table(title: str, group_label: str, groups: dict[str, Accuracy], overall: Accuracy,
                  macro: Optional[float], macro_label: str) -> str:
    """A plain-text table: one row per group, then the micro and macro averages."""
    def fmt(a: Optional[float]) -> str:
        return "-" if a is None else f"{a:.4f}"

    width = max([len(group_label), len(macro_label)] + [len(n) for n in groups])
    rows = [title, f"  {group_label:<{width}}  {'count':>7}  {'ties':>5}  {'accuracy':>8}"]
    for name, g in groups.items():
        rows.append(f"  {name:<{width}}  {g.count:>7}  {g.ties:>5}  {fmt(g.accuracy):>8}")
    rows.append(f"  {'overall':<{width}}  {overall.count:>7}  {overall.ties:>5}  "
                f"{fmt(overall.accuracy):>8}")
    rows.append(f"  {macro_label:<{width}}  {len(groups):>7}  {'':>5}  {fmt(macro):>8}")
    return "\n".join(rows)


# ---- reading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankedRecord:
    where: str  # file:line
    prompt: Any
    responses: list  # best first
    category: str
    wrapper: str = "sft"
    id: Any = None


def read_ranked(patterns: Sequence[str], category_field: str = "category") -> list[RankedRecord]:
    """Every ranked record of the files (globs allowed, .gz too), in order; EvalInputError
    names the first bad line."""
    try:
        files = expand_inputs(list(patterns))
    except FileNotFoundError as e:
        raise EvalInputError(str(e)) from None
    records = []
    for line in iter_lines(files):
        try:
            rec = parse_json_object(line.raw, RANKING_FIELDS)
            ranking_pairs(rec)  # the responses list: >= 3, each a string or message list
            wrapper = record_wrapper(rec)
            category = rec.get(category_field)
            if category is None:
                category = UNCATEGORIZED
            elif isinstance(category, (str, int)) and not isinstance(category, bool):
                category = str(category)
            else:
                raise RecordError(f"field '{category_field}' must be a string, got "
                                  f"{type(category).__name__}")
        except RecordError as e:
            raise EvalInputError(f"{line.where}: {e}") from None
        records.append(RankedRecord(line.where, rec["prompt"], rec["responses"], category,
                                    wrapper, rec.get("id")))
    if not records:
        raise EvalInputError(f"no ranked records in {', '.join(files)}")
    return records


# ---- evaluating -------------------------------------------------------------------------------

@dataclass
class PreferenceOutcome:
    where: str
    category: str
    chosen_reward: float  # r(p, responses[0], responses[1])
    rejected_reward: float  # r(p, responses[0], responses[2])
    credit: float
    id: Any = None


@dataclass
class PreferenceReport:
    overall: Accuracy  # micro: over records
    categories: dict[str, Accuracy]  # sorted by name
    outcomes: list[PreferenceOutcome] = field(default_factory=list)

    @property
    def macro_accuracy(self) -> Optional[float]:
        return macro_mean(self.categories)

    def as_dict(self) -> dict:
        return {"protocol": "reference = responses[0]; correct if r(responses[1]) > "
                            "r(responses[2]); ties count 1/2",
                "overall": self.overall.as_dict(), "macro_accuracy": self.macro_accuracy,
                "categories": {n: a.as_dict() for n, a in self.categories.items()},
                "records": [vars(o) for o in self.outcomes]}

    def table(self) -> str:
        return grouped_table("preference accuracy (reference = 1st, prefer 2nd over 3rd)",
                             "category", self.categories, self.overall, self.macro_accuracy,
                             "mean over categories")


def evaluate_preference(records: Sequence[RankedRecord], score_fn: ScoreFn) -> PreferenceReport:
    """Score each record's 2nd and 3rd responses against its 1st, in one call of `score_fn`."""
    batch = []
    for r in records:
        for k in (1, 2):
            batch.append(ScoreRecord(r.prompt, r.responses[0], r.responses[k], r.wrapper,
                                     where=f"{r.where} (responses[{k}])"))
    rewards = list(score_fn(batch))
    if len(rewards) != len(batch):
        raise ValueError(f"score_fn returned {len(rewards)} rewards for {len(batch)} records")
    overall, categories, outcomes = Accuracy(), {}, []
    for r, chosen, rejected in zip(records, rewards[::2], rewards[1::2]):
        c = overall.add(chosen, rejected)
        categories.setdefault(r.category, Accuracy()).add(chosen, rejected)
        outcomes.append(PreferenceOutcome(r.where, r.category, chosen, rejected, c, r.id))
    return PreferenceReport(overall, dict(sorted(categories.items())), outcomes)


def preference_accuracy(patterns: Sequence[str], score_fn: ScoreFn,
                        category_field: str = "category") -> PreferenceReport:
    """`read_ranked` then `evaluate_preference`."""
    return evaluate_preference(read_ranked(patterns, category_field), score_fn)
