"""The prompt set of a sampling run (POLAR paper, appendix A.1).

- corpus prompts: `num_prompts` documents of a pre-training corpus, chosen by seeded reservoir
  sampling (streaming, any corpus size), each cut to a random prefix of uniform length in
  [min_prefix_tokens, max_prefix_tokens] tokens (capped at the document's length). The cut
  is made in the original text at the character offset where that token ends, so the prompt
  is the corpus text itself, not a decode of it.
- instruction prompts: the `prompt` field (a string or a list of chat messages) of JSONL
  records, all of them or `num_instructions` chosen by reservoir sampling.

The set is written once to OUTPUT/prompts.jsonl with its settings in prompts.meta.json and
read back by every later run or array task, so all policies and shards see one prompt set.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from megatron_polar.data.encoding import RecordError
from megatron_polar.data.records import atomic_file, expand_inputs, iter_lines, parse_json_object

PROMPTS_FILE = "prompts.jsonl"
META_FILE = "prompts.meta.json"
FORMAT = "megatron-polar-prompts/1"


class PromptError(ValueError):
    """Bad prompt input or a prompt set built with other settings; names the file/line."""


@dataclass(frozen=True)
class PromptSettings:
    corpus: tuple[str, ...] = ()
    corpus_field: str = "text"
    num_prompts: Optional[int] = None
    min_prefix_tokens: int = 1
    max_prefix_tokens: int = 1024
    prefix_tokenizer: Optional[str] = None
    instructions: tuple[str, ...] = ()
    num_instructions: Optional[int] = None  # None: every instruction prompt
    seed: int = 1234

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as read back from JSON


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    kind: str     # "corpus" or "instruction"
    prompt: Any   # corpus: str; instruction: str or a list of {"role", "content"} messages
    source: str   # "file:line" of the document or instruction record


# ---- reading -----------------------------------------------------------------------------------

def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def _json_lines(path: str) -> Iterator[tuple[str, dict]]:
    for line in iter_lines([path]):
        try:
            yield line.where, parse_json_object(line.raw, ())
        except RecordError as e:
            raise PromptError(f"{line.where}: {e}") from None


def iter_documents(files: Iterable[str], field: str) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank document: a JSONL record's `field`, or in plain text
    files the runs of lines between blank lines."""
    for path in files:
        if _is_jsonl(path):
            for where, record in _json_lines(path):
                text = record.get(field)
                if not isinstance(text, str):
                    raise PromptError(f"{where}: no string field {field!r} (--corpus-field)")
                if text.strip():
                    yield where, text
            continue
        with _open_text(path) as f:
            lines: list[str] = []
            start = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    if not lines:
                        start = number
                    lines.append(line)
                elif lines:
                    yield f"{path}:{start}", "".join(lines).rstrip("\n")
                    lines = []
            if lines:
                yield f"{path}:{start}", "".join(lines).rstrip("\n")


def _check_messages(value: Any, where: str) -> Any:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        return value
    raise PromptError(f"{where}: field 'prompt' must be a non-empty string or a list of "
                      "{'role', 'content'} messages")


def iter_instructions(files: Iterable[str]) -> Iterator[tuple[str, Any]]:
    for path in files:
        for where, record in _json_lines(path):
            if "prompt" not in record:
                raise PromptError(f"{where}: missing field 'prompt'")
            yield where, _check_messages(record["prompt"], where)


def reservoir_sample(items: Iterable, k: int, rng: random.Random) -> list:
    """k items chosen uniformly from a stream of unknown length (algorithm R), in stream order."""
    chosen: list[tuple[int, Any]] = []
    for i, item in enumerate(items):
        if i < k:
            chosen.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                chosen[j] = (i, item)
    return [item for _, item in sorted(chosen, key=lambda t: t[0])]


# ---- prefixes ----------------------------------------------------------------------------------

def cut_prefix(text: str, n_tokens: int, tokenizer) -> str:
    """The first `n_tokens` tokens of `text` (all of it if shorter), as the original text up to
    the character where the last of them ends. Only a window of the text is tokenized; it grows
    until it holds a token beyond the cut, so the window's edge cannot change the cut."""
    window = max(256, 8 * n_tokens)
    while True:
        enc = tokenizer(text[:window], add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if window >= len(text) or len(offsets) > n_tokens + 1:
            break
        window *= 4
    n = min(n_tokens, len(offsets))
    return text[: offsets[n - 1][1]] if n else text


def _corpus_prompts(settings: PromptSettings, tokenizer) -> Iterator[Prompt]:
    """Two streaming passes, so that memory holds document numbers, not documents: the first
    chooses `num_prompts` of them, the second cuts their prefixes."""
    files = expand_inputs(list(settings.corpus))
    numbers = (i for i, _ in enumerate(iter_documents(files, settings.corpus_field)))
    chosen = set(reservoir_sample(numbers, settings.num_prompts,
                                  random.Random(f"corpus/{settings.seed}")))
    lengths = random.Random(f"prefix/{settings.seed}")
    ordinal = 0
    for i, (where, text) in enumerate(iter_documents(files, settings.corpus_field)):
        if i in chosen:
            n = lengths.randint(settings.min_prefix_tokens, settings.max_prefix_tokens)
            yield Prompt(f"c{ordinal:06d}", "corpus", cut_prefix(text, n, tokenizer), where)
            ordinal += 1


def _instruction_prompts(settings: PromptSettings) -> Iterator[Prompt]:
    items = iter_instructions(expand_inputs(list(settings.instructions)))
    if settings.num_instructions is not None:
        items = reservoir_sample(items, settings.num_instructions,
                                 random.Random(f"instructions/{settings.seed}"))
    for i, (where, prompt) in enumerate(items):
        yield Prompt(f"i{i:06d}", "instruction", prompt, where)


def build_prompts(settings: PromptSettings, load_tokenizer: Callable[[str], Any]
                  ) -> Iterator[Prompt]:
    """The prompt set, corpus prompts first, as a stream."""
    if not settings.corpus and not settings.instructions:
        raise PromptError("no prompts: give --corpus and/or --instructions")
    if settings.corpus:
        if not settings.num_prompts or settings.num_prompts < 1:
            raise PromptError("--corpus needs --num-prompts (how many documents to sample)")
        tokenizer = load_tokenizer(settings.prefix_tokenizer)
        if not getattr(tokenizer, "is_fast", False):
            raise PromptError(f"prefix tokenizer {settings.prefix_tokenizer}: a fast tokenizer "
                              "(tokenizer.json) is needed for character offsets")
        yield from _corpus_prompts(settings, tokenizer)
    if settings.instructions:
        yield from _instruction_prompts(settings)


# ---- the prompt set on disk --------------------------------------------------------------------

def read_prompts(path: Path, select: Optional[Callable[[int], bool]] = None
                 ) -> list[tuple[int, Prompt]]:
    """(position, prompt) of the prompts in a prompt set, those whose position `select`s."""
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if select is None or select(i):
                out.append((i, Prompt(**json.loads(line))))
    return out


def load_or_build_prompts(output: str, settings: PromptSettings,
                          load_tokenizer: Callable[[str], Any],
                          select: Optional[Callable[[int], bool]] = None
                          ) -> list[tuple[int, Prompt]]:
    """The run's prompt set as (position, prompt), filtered by `select`: read from OUTPUT when
    present (refused if built with other settings), else built and written first."""
    out = Path(output)
    prompts_path, meta_path = out / PROMPTS_FILE, out / META_FILE
    want = settings.as_json()
    if prompts_path.is_file():
        if not meta_path.is_file():
            raise PromptError(f"{prompts_path} exists without {META_FILE}; remove it or use "
                              "another --output")
        have = json.loads(meta_path.read_text()).get("settings", {})
        if have != want:
            diff = ", ".join(f"{k}: {have.get(k)!r} there, {want[k]!r} now"
                             for k in sorted(want) if have.get(k) != want[k])
            raise PromptError(f"{prompts_path} was built with other prompt settings ({diff}); "
                              "use the same settings or another --output")
        return read_prompts(prompts_path, select)

    out.mkdir(parents=True, exist_ok=True)
    counts = {"corpus": 0, "instruction": 0}
    # Metadata goes in place before prompts.jsonl, so a prompts.jsonl never lacks it.
    # Array tasks racing to build the set write the same content: atomic_file leaves it whole.
    with atomic_file(prompts_path) as f:
        for prompt in build_prompts(settings, load_tokenizer):
            f.write(json.dumps(asdict(prompt), ensure_ascii=False).encode() + b"\n")
            counts[prompt.kind] += 1
        if not sum(counts.values()):
            raise PromptError("the corpus and instruction files hold no prompts")
        with atomic_file(meta_path) as m:
            m.write(json.dumps({"format": FORMAT, "settings": want, "counts": counts},
                               indent=2).encode() + b"\n")
    return read_prompts(prompts_path, select)


# ---- a prompt as a policy's input --------------------------------------------------------------

def prompt_messages(prompt: Any) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids a policy continues: corpus prefixes as raw text (with whatever BOS the
    tokenizer adds by itself), instruction prompts through the chat template with the
    assistant turn opened. Templates write their own special tokens, so none are added."""
    if prompt.kind == "corpus":
        return list(tokenizer(prompt.prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt_messages(prompt.prompt), tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
