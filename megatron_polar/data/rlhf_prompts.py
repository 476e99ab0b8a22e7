"""POLAR-style RLHF prompts (prompt, reference) -> NeMo-Aligner's prompt files + our reference file.

NeMo-Aligner's PPO actor reads JSONL lines `{"text": ...}` and generates from `text`; our reward
server needs, for the same `text`, the POLAR prompt and the reference trajectory
(`megatron_polar/serving/references.py`). One pass writes both, from the same records, so they
cannot drift apart:

    OUT/train.jsonl, OUT/validation.jsonl   {"text": ...}           (NeMo-Aligner data_prefix)
    OUT/references.jsonl                    {"text", "prompt", "reference", "wrapper"[, "id"]}
    OUT/rejects.jsonl                       {"where": "file:line", "reason": ...}

`text` is the prompt as the actor must see it: by default its plain text (chat messages'
contents joined with "\\n", as POLAR's encoding does), or a format string with `{prompt}`, or
the chat template of the actor's HF tokenizer. Every input line is written or rejected with a
reason: bad JSON, a missing or mistyped field, an empty prompt, a record the chat template
refuses, or a `text` already seen with a different (prompt, reference, wrapper); exact repeats
are written once and counted.

The validation split is a seeded random choice of prompts, so it is reproducible. It is never
empty when there are two prompts or more: NeMo-Aligner builds its validation dataset from
`validation.jsonl` unconditionally, and an empty file fails there (v0.7.0's RLHFDataset takes
the min and max of its document indices).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from megatron_polar.data.encoding import WRAPPERS, RecordError, field_text
from megatron_polar.data.records import atomic_file, expand_inputs, iter_lines, parse_json_object

PROMPT_FIELDS = ("prompt", "reference")


@dataclass
class PromptSummary:
    read: int = 0
    written: int = 0
    train: int = 0
    validation: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejects: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("rejects", "warnings")}


def template_formatter(template: str) -> Callable[[Any], str]:
    """`{prompt}` in `template` replaced by the prompt's plain text."""
    if "{prompt}" not in template:
        raise ValueError("--prompt-template must contain {prompt}")

    def fmt(prompt: Any) -> str:
        # str.replace, not str.format: templates may hold other braces (JSON, code).
        return template.replace("{prompt}", field_text(prompt, "prompt"))

    return fmt


def chat_template_formatter(tokenizer_dir: str) -> Callable[[Any], str]:
    """The actor's chat template (transformers), with the assistant's turn opened; a string
    prompt is one user message."""
    from transformers import AutoTokenizer

    # A local directory only: a typo must not turn into a Hub download (or its odd error).
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"--chat-template-from {tokenizer_dir}: no such directory")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no chat template")

    def fmt(prompt: Any) -> str:
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            field_text(prompt, "prompt")  # a list of messages with string contents
            for i, message in enumerate(prompt):
                if not isinstance(message.get("role"), str):
                    raise RecordError(f"field 'prompt': message {i} has no string 'role'")
            messages = prompt
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            # Templates raise whatever jinja or their own raise_exception() gives (roles out of
            # order, a system turn they do not take): a fault of this record, not of the run.
            raise RecordError(f"chat template refuses the prompt: {e}") from None

    return fmt


def _entry(record: dict, fmt: Callable[[Any], str]) -> dict:
    prompt, reference = record["prompt"], record["reference"]
    if not field_text(prompt, "prompt").strip():
        raise RecordError("empty prompt")
    field_text(reference, "reference")
    wrapper = record.get("wrapper", "sft")
    if wrapper not in WRAPPERS:
        raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
    text = fmt(prompt)
    if not isinstance(text, str) or not text:
        raise RecordError("the prompt template gives no text")
    entry = {"text": text, "prompt": prompt, "reference": reference, "wrapper": wrapper}
    if "id" in record:
        entry["id"] = record["id"]
    return entry


def validation_size(n_prompts: int, fraction: float) -> int:
    """round(fraction * n), but at least 1 and at most n - 1 when n >= 2 (both files non-empty)."""
    if n_prompts < 2:
        return 0
    return min(max(round(fraction * n_prompts), 1), n_prompts - 1)


def prefix_texts(texts: Iterable[str]) -> list[tuple[str, str]]:
    """(text, a longer text that starts with it) pairs. The server gives a rollout the LONGEST
    prompt that starts it, so a rollout of the shorter prompt whose response happens to go on
    like the longer one is scored against the wrong reference. In sorted order every string
    that starts with t follows t directly, so neighbours suffice."""
    ordered = sorted(set(texts))
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if b.startswith(a)]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())


def make_rlhf_prompts(inputs: list[str], output_dir: str | Path,
                      fmt: Optional[Callable[[Any], str]] = None,
                      validation_fraction: float = 0.01, seed: int = 1234,
                      reject_file: Optional[str | Path] = None) -> PromptSummary:
    if not 0 < validation_fraction < 1:
        raise ValueError(f"--validation-fraction must lie in (0, 1), got {validation_fraction} "
                         "(NeMo-Aligner needs a non-empty validation file)")
    fmt = fmt or template_formatter("{prompt}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = PromptSummary()
    entries: list[dict] = []
    seen: dict[str, tuple[dict, str]] = {}
    for line in iter_lines(expand_inputs(inputs)):
        summary.read += 1
        try:
            entry = _entry(parse_json_object(line.raw, PROMPT_FIELDS), fmt)
            old = seen.get(entry["text"])
            if old is not None:
                same = all(old[0][k] == entry[k] for k in ("prompt", "reference", "wrapper"))
                if not same:
                    raise RecordError(f"prompt text repeats {old[1]} with a different prompt, "
                                      "reference or wrapper")
                summary.duplicates += 1
                continue
        except RecordError as e:
            summary.rejects.append({"where": line.where, "reason": str(e)})
            continue
        seen[entry["text"]] = (entry, line.where)
        entries.append(entry)
    summary.rejected = len(summary.rejects)
    summary.written = len(entries)

    n_val = validation_size(len(entries), validation_fraction)
    val_ids = set(random.Random(seed).sample(range(len(entries)), n_val))
    summary.validation, summary.train = n_val, len(entries) - n_val
    if len(entries) == 1:
        summary.warnings.append("one prompt only: validation.jsonl is empty, which NeMo-Aligner "
                                "cannot read")
    pairs = prefix_texts(e["text"] for e in entries)
    if pairs:
        short, long = pairs[0]
        summary.warnings.append(
            f"{len(pairs)} prompt text(s) start another one, e.g. {short[:60]!r} starts "
            f"{long[:80]!r}: the server takes the longest match, so end prompts with a "
            "template (--prompt-template or --chat-template-from) that no prompt continues")

    # The reference file first: should the run die part-way, the server's table is already
    # the new one when the actor's prompt files change, never older than them.
    _write_jsonl(out / "references.jsonl", entries)
    _write_jsonl(out / "validation.jsonl", ({"text": e["text"]} for i, e in enumerate(entries)
                                            if i in val_ids))
    _write_jsonl(out / "train.jsonl", ({"text": e["text"]} for i, e in enumerate(entries)
                                       if i not in val_ids))
    _write_jsonl(Path(reject_file) if reject_file else out / "rejects.jsonl", summary.rejects)
    return summary
