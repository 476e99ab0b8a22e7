"""Finding each rollout's prompt, and so its reference trajectory, from token ids alone.

NeMo-Aligner's PPO actor sends the reward server right-padded token ids and lengths, nothing
else. A POLAR reward needs the prompt's reference, so the server keeps a table of every RLHF
prompt (the reference file, written by `tools/make_rlhf_prompts.py` beside NeMo-Aligner's prompt
JSONL) and recognises the prompt at the start of each sequence:

- each entry's `text` (exactly the `text` the actor's prompt file holds) is tokenized the way
  NeMo-Aligner's PPO prompt dataset tokenizes it (`ActorTokenizer.prompt_ids`);
- a sequence's prompt is the LONGEST entry whose ids start the sequence (a prompt may be a prefix
  of another one); the ids after it, up to the sequence's length, are the response.

Lookup hashes prefixes: each entry is filed under (length, hash of its ids); a sequence's prefix
hashes are computed once, and only the lengths that some entry has are probed, longest first,
with the ids compared on a hash hit. Memory is one small tuple per entry, whatever the lengths.

Reference file: JSONL, one object per line,

    {"text": "<what the actor sees>", "prompt": "<POLAR prompt>", "reference": "<trajectory>"}

`prompt` (string or chat messages) is what the reward model sees; it defaults to `text` (it
differs when `text` carries the actor's chat template). Optional `wrapper` ("sft" or
"pretrain"). Two entries with the same `text` but different (prompt, reference, wrapper) are an
error naming both lines; exact repeats are kept once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_polar.data.encoding import WRAPPERS, RecordError, field_text
from megatron_polar.data.records import iter_lines, parse_json_object

_MOD = (1 << 61) - 1  # a Mersenne prime: prefix hashes stay in Python's small-int range
_BASE = 1_000_003


def prefix_hashes(ids: Sequence[int]) -> list[int]:
    """h[k] = hash of ids[:k], for k = 0..len(ids)."""
    h = [0] * (len(ids) + 1)
    acc = 0
    for k, t in enumerate(ids, start=1):
        acc = (acc * _BASE + int(t) + 1) % _MOD
        h[k] = acc
    return h


class ActorTokenizer:
    """The PPO actor's tokenizer, used to recognise prompts and to read responses back as text.

    Tokenizes exactly as NeMo-Aligner's prompt dataset (`RLHFDataset.encode`) does: NeMo's
    `text_to_ids`, which adds no BOS or EOS; decodes responses with special tokens skipped.
    Accepts a sentencepiece `.model` file or a directory with `tokenizer.model` or
    `tokenizer.json`.
    """

    def __init__(self, path: str | Path, eos_ids: Sequence[int] = ()):
        self.path = Path(path)
        model = self.path if self.path.is_file() else self.path / "tokenizer.model"
        self._sp = self._hf = None
        if model.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
            eos = [self._sp.eos_id()]
        elif (self.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            eos = [self._hf.token_to_id(t) for t in _hf_eos_tokens(self.path)]
        else:
            raise FileNotFoundError(f"actor tokenizer {self.path}: expected a sentencepiece "
                                    ".model file or a directory with tokenizer.model or "
                                    "tokenizer.json")
        # Ids that end a rollout (the actor's EOS); cut from the end of a response before it
        # is decoded, as the reward model never saw them in training text.
        chosen = list(eos_ids) or eos
        self.eos_ids = frozenset(int(i) for i in chosen if i is not None and i >= 0)

    def text_to_ids(self, text: str) -> list[int]:
        if self._sp is not None:
            return list(self._sp.encode_as_ids(text))
        return self._hf.encode(text, add_special_tokens=False).ids

    def prompt_ids(self, text: str) -> list[int]:
        return self.text_to_ids(text)

    def response_text(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        while ids and ids[-1] in self.eos_ids:
            ids.pop()
        if not ids:
            return ""
        if self._sp is not None:
            return self._sp.decode_ids(ids)
        return self._hf.decode(ids, skip_special_tokens=True)


def _hf_eos_tokens(directory: Path) -> list[str]:
    """The EOS token(s) an HF tokenizer directory declares (tokenizer_config.json's
    `eos_token`, a string or an AddedToken dict), else Llama's "</s>"."""
    import json

    config = directory / "tokenizer_config.json"
    eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return [eos] if isinstance(eos, str) and eos else ["</s>"]


@dataclass(frozen=True)
class ReferenceEntry:
    text: str
    prompt: Any  # string or chat messages, as the reward model sees it
    reference: Any
    wrapper: str
    where: str  # file:line


class UnknownPrompt(LookupError):
    """No entry of the reference file starts the sequence."""


class ReferenceTable:
    """Prompt ids -> reference entry; `match(ids)` finds the longest prompt starting `ids`."""

    def __init__(self, entries: Sequence[ReferenceEntry], tokenizer: ActorTokenizer):
        self.entries = list(entries)
        self.tokenizer = tokenizer
        self._ids: list[tuple[int, ...]] = []
        self._by_key: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self.entries):
            ids = tuple(tokenizer.prompt_ids(e.text))
            if not ids:
                raise RecordError(f"{e.where}: field 'text' tokenizes to no ids")
            self._ids.append(ids)
            self._by_key.setdefault((len(ids), prefix_hashes(ids)[-1]), []).append(i)
        self._lengths = sorted({n for n, _ in self._by_key}, reverse=True)

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: ActorTokenizer) -> "ReferenceTable":
        entries: list[ReferenceEntry] = []
        seen: dict[str, ReferenceEntry] = {}
        for line in iter_lines([str(path)]):
            try:
                obj = parse_json_object(line.raw, ("text", "reference"))
                entry = _entry(obj, line.where)
            except RecordError as e:
                raise RecordError(f"{line.where}: {e}") from None
            old = seen.get(entry.text)
            if old is not None:
                if (old.prompt, old.reference, old.wrapper) != (entry.prompt, entry.reference,
                                                                 entry.wrapper):
                    raise RecordError(f"{line.where}: prompt text repeats {old.where} with a "
                                      "different prompt, reference or wrapper")
                continue
            seen[entry.text] = entry
            entries.append(entry)
        if not entries:
            raise RecordError(f"{path}: no reference entries")
        return cls(entries, tokenizer)

    def match(self, ids: Sequence[int]) -> tuple[ReferenceEntry, int]:
        """(entry, prompt length in ids) of the longest prompt that starts `ids`."""
        hashes = prefix_hashes(ids)
        for n in self._lengths:
            if n > len(ids):
                continue
            for i in self._by_key.get((n, hashes[n]), ()):
                if tuple(ids[:n]) == self._ids[i]:
                    return self.entries[i], n
        raise UnknownPrompt("no prompt of the reference file starts this sequence")


def _entry(obj: dict, where: str) -> ReferenceEntry:
    text = obj["text"]
    if not isinstance(text, str) or not text:
        raise RecordError("field 'text' must be a non-empty string")
    prompt = obj.get("prompt", text)
    field_text(prompt, "prompt")  # a string or messages: checked here, not at serving time
    field_text(obj["reference"], "reference")
    wrapper = obj.get("wrapper", "sft")
    if wrapper not in WRAPPERS:
        raise RecordError(f"field 'wrapper' must be one of {WRAPPERS}, got {wrapper!r}")
    return ReferenceEntry(text, prompt, obj["reference"], wrapper, where)


def optional_int_list(value: Optional[str]) -> list[int]:
    """'2,7' -> [2, 7] (a CLI helper for --actor-eos-ids)."""
    return [int(v) for v in value.split(",") if v.strip()] if value else []
