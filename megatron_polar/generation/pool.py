"""The policy pool file: which models sample trajectories, under which names.

One policy per line; blank lines and lines starting with '#' are ignored:

    PATH                    name = the directory's basename
    NAME PATH
    [NAME] PATH base|chat   kind given explicitly

PATH is a local Hugging Face model directory, relative paths resolve against the pool file's
directory (so a pool file and its models can move together). Without an explicit kind a
policy is "chat" when its tokenizer has a chat template, else "base"; that is decided once the
tokenizer is loaded (`resolve_kind`). A policy's name is its output directory and the
`policy` field of its trajectories, so names must be unique and file-name safe.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

KINDS = ("base", "chat")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class PoolError(ValueError):
    """A bad pool file or policy selection; the message names the file and line."""


@dataclass(frozen=True)
class Policy:
    name: str
    path: str
    kind: Optional[str]  # None: decided from the tokenizer's chat template
    where: str           # "pool-file:line", for messages


def read_pool(pool_file: str) -> list[Policy]:
    path = Path(pool_file)
    if not path.is_file():
        raise PoolError(f"policy pool file not found: {pool_file}")
    policies: list[Policy] = []
    seen: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        where = f"{pool_file}:{number}"
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        kind = None
        if len(words) > 1 and words[-1] in KINDS:
            kind = words.pop()
        if len(words) == 1:
            model_path, name = words[0], None
        elif len(words) == 2:
            name, model_path = words
        else:
            raise PoolError(f"{where}: expected 'PATH' or 'NAME PATH', optionally followed by "
                            f"'base' or 'chat'; got {raw.strip()!r}")
        model_dir = Path(model_path)
        if not model_dir.is_absolute():
            model_dir = path.parent / model_dir
        if not model_dir.is_dir():
            raise PoolError(f"{where}: model directory not found: {model_dir}")
        name = name or model_dir.resolve().name
        if not _NAME.match(name):
            raise PoolError(f"{where}: policy name {name!r} must be letters, digits and . _ + - "
                            "(it names the output directory); give one as 'NAME PATH'")
        if name in seen:
            raise PoolError(f"{where}: policy name {name!r} already used at {seen[name]}; give "
                            "each policy its own name as 'NAME PATH'")
        seen[name] = where
        # Absolute, so the prompt-set settings that record it do not depend on the cwd.
        policies.append(Policy(name, os.path.abspath(model_dir), kind, where))
    if not policies:
        raise PoolError(f"{pool_file}: no policies listed")
    return policies


def select_policies(pool: list[Policy], selectors: Sequence[str]) -> list[Policy]:
    """The policies named (or indexed, 0-based in file order) by `selectors`; all when empty."""
    if not selectors:
        return list(pool)
    by_name = {p.name: p for p in pool}
    chosen: list[Policy] = []
    for s in selectors:
        if s in by_name:
            policy = by_name[s]
        elif s.isdigit() and int(s) < len(pool):
            policy = pool[int(s)]
        else:
            raise PoolError(f"--policy {s!r}: no such policy name, and not an index below "
                            f"{len(pool)}")
        if policy not in chosen:
            chosen.append(policy)
    return chosen


def resolve_kind(policy: Policy, tokenizer) -> str:
    """The policy's kind: as given in the pool file, else chat iff it has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if policy.kind == "chat" and not has_template:
        raise PoolError(f"{policy.where}: {policy.name} is marked 'chat' but its tokenizer has "
                        "no chat template to wrap instruction prompts in")
    if policy.kind is not None:
        return policy.kind
    return "chat" if has_template else "base"
