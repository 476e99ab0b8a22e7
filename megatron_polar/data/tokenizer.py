"""Tokenizers for POLAR data: a sentencepiece `.model` file or a Hugging Face tokenizer directory.

The POLAR special ids (the `<|reward|>` separator and the reward token) are inserted as ids by
the encoder, never found by tokenizing their text, so a tokenizer whose vocabulary lacks the
piece still encodes exactly. They come from the tokenizer (piece lookup, `config.json`'s
`reward_token_id`) or from explicit overrides.

Special-token text inside data ("<s>", "</s>", "<unk>", "<|reward|>", the reward token's text,
a tokenizer's other special tokens) is handled as the released POLAR pipeline handles it: an HF
tokenizer splits the text at each special token (the pieces between are encoded on their own,
each with its dummy prefix) and gives the token's id, and decoding with special tokens skipped
drops it. `encode` does the same (so truncation counts those ids as the released code does) and
`decode` drops every special id, so `decode(encode(text))` is the text with its special tokens
removed (docs/data.md, "Special-token text"). `special_text` finds what is left to remove.

A sentencepiece model with identity normalisation and byte fallback (InternLM2's kind) provably
round-trips text; `round_trips` and `token_bound` let the encoder skip the measuring encodes
and the decodes for records that cannot need truncation (encoding.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REWARD_SEPARATOR = "<|reward|>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
# Files whose bytes define a tokenizer's behaviour (hashed into its identity).
_IDENTITY_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# What a tokenizer directory ships with a model: the files above plus InternLM2's remote code.
TOKENIZER_FILES = _IDENTITY_FILES + ("tokenization_internlm2.py", "tokenization_internlm2_fast.py")


def copy_tokenizer(source: str | Path, target: Path) -> list[str]:
    """Copy a tokenizer (a sentencepiece `.model` file, or the tokenizer files of a directory)
    into directory `target`, created if needed; a lone `.model` becomes `tokenizer.model`.
    Returns the names copied."""
    import shutil

    source = Path(source)
    target.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        shutil.copy2(source, target / "tokenizer.model")
        return ["tokenizer.model"]
    names = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    for name in names:
        shutil.copy2(source / name, target / name)
    return names


SPACE_PIECE = "\u2581"  # "▁": sentencepiece's escaped space


# ---- the few sentencepiece ModelProto fields we need, read from the wire format -----------
# google.protobuf is not a core dependency, and the fields are few. Numbers as in
# sentencepiece_model.proto: ModelProto.trainer_spec = 2, .normalizer_spec = 3,
# .denormalizer_spec = 5; TrainerSpec.treat_whitespace_as_suffix = 24, .byte_fallback = 35;
# NormalizerSpec.name = 1, .precompiled_charsmap = 2, .add_dummy_prefix = 3,
# .remove_extra_whitespaces = 4, .escape_whitespaces = 5 (defaults as in the .proto).

def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated or malformed varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def proto_fields(data: bytes, wanted: set[int]) -> dict[int, list]:
    """Values of the `wanted` top-level fields of a serialized protobuf message, in order:
    varints as ints, length-delimited fields as bytes. Other fields are skipped."""
    fields: dict[int, list] = {}
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            if i + length > n:
                raise ValueError("truncated length-delimited field")
            value, i = data[i:i + length], i + length
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire} (field {number})")
        if number in wanted:
            fields.setdefault(number, []).append(value)
    if i != n:
        raise ValueError("truncated fixed-width field")
    return fields


def _message(fields: dict, number: int, wanted: set[int]) -> dict[int, list]:
    # Repeated occurrences of a message field merge: the same as parsing their concatenation.
    parts = fields.get(number, [])
    if not all(isinstance(p, bytes) for p in parts):
        raise ValueError(f"field {number} is not a message")
    return proto_fields(b"".join(parts), wanted)


def _last(fields: dict, number: int, kind: type, default):
    # For a scalar field the last occurrence wins.
    if number not in fields:
        return default
    value = fields[number][-1]
    if not isinstance(value, int if kind is bool else bytes):
        raise ValueError(f"field {number} has the wrong wire type")
    return bool(value) if kind is bool else value


def sentencepiece_spec(model: bytes) -> dict:
    """The settings of a serialized sentencepiece ModelProto that decide whether it round-trips."""
    top = proto_fields(model, {2, 3, 5})
    trainer = _message(top, 2, {24, 35})
    norm = _message(top, 3, {1, 2, 3, 4, 5})
    denorm = _message(top, 5, {2})
    return {
        "byte_fallback": _last(trainer, 35, bool, False),
        "treat_whitespace_as_suffix": _last(trainer, 24, bool, False),
        "normalizer_name": _last(norm, 1, bytes, b"").decode("utf-8", "replace"),
        "precompiled_charsmap": _last(norm, 2, bytes, b""),
        "add_dummy_prefix": _last(norm, 3, bool, True),
        "remove_extra_whitespaces": _last(norm, 4, bool, True),
        "escape_whitespaces": _last(norm, 5, bool, True),
        "denormalizer_charsmap": _last(denorm, 2, bytes, b""),
    }


def spec_round_trips(spec: dict) -> bool:
    """Whether the proto settings make encode/decode an exact round trip: identity normalisation
    (no charsmap, whitespace kept, spaces escaped to "▁", dummy prefix in front if any), no
    denormaliser, and byte fallback so that no <unk> can appear."""
    return (spec["normalizer_name"] == "identity" and not spec["precompiled_charsmap"]
            and not spec["remove_extra_whitespaces"] and spec["escape_whitespaces"]
            and not spec["treat_whitespace_as_suffix"] and not spec["denormalizer_charsmap"]
            and spec["byte_fallback"])


@dataclass(frozen=True)
class TokenizerIdentity:
    path: str
    sha256: str

    def as_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256}


class PolarTokenizer:
    """Text -> ids without special tokens, plus the ids POLAR sequences need."""

    def __init__(self, path: str | Path, *, separator_id: Optional[int] = None,
                 reward_token_id: Optional[int] = None, bos_id: Optional[int] = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"tokenizer not found: {self.path}")
        lookup, default_bos, special_texts, hf_added = self._open()
        config = self._hf_config()
        self.separator_id = self._resolve("separator_id", separator_id, lookup(REWARD_SEPARATOR))
        self.reward_token_id = self._resolve(
            "reward_token_id", reward_token_id,
            config.get("reward_token_id", lookup(REWARD_TOKEN)))
        self.bos_id = self._resolve("bos_id", bos_id, config.get("bos_token_id", default_bos))
        if self.separator_id == self.reward_token_id:
            raise ValueError(f"{self.path}: separator and reward token share id {self.separator_id}")
        self.special_texts = self._special_texts(special_texts)
        self.drop_ids = frozenset(self.special_texts.values())
        # What text must never encode to: every special id except the unknown token's, which
        # a tokenizer without byte fallback gives for unknown characters (released code too).
        self.never_from_text = self.drop_ids - {self._unk_id()}
        # Longest first: at one position the longest special text wins (as in HF's trie).
        # An HF tokenizer splits at its own added tokens (honouring their strip options); the
        # other special texts (e.g. `<|reward|>` when tokenizer.json lacks it) are split here.
        longest_first = sorted(self.special_texts, key=len, reverse=True)
        split_here = [t for t in longest_first if t not in hf_added]
        self._split_re = re.compile("|".join(map(re.escape, split_here))) if split_here else None
        # `special_text` looks for first characters, then texts, with C-level `in` (a regex or
        # a Python loop over every "<" of a field would cost more than encoding it).
        self._by_first_char: dict[str, list[str]] = {}
        for t in longest_first:
            self._by_first_char.setdefault(t[0], []).append(t)

    def _open(self):
        """Load the sentencepiece model or the HF tokenizer.json at `self.path`: (piece -> id
        lookup, the tokenizer's own BOS id, its special texts -> ids, the texts HF splits at
        itself)."""
        model_file = self.path if self.path.is_file() else self.path / "tokenizer.model"
        json_file = None if self.path.is_file() else self.path / "tokenizer.json"
        if model_file.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            lookup = self._sp_lookup
            default_bos = self._sp.bos_id()
            self.round_trips = self._sp_round_trips(model_file.read_bytes())
            return lookup, default_bos, self._sp_special_texts(), set()
        elif json_file is not None and json_file.is_file():
            try:
                from tokenizers import Tokenizer
            except ImportError:
                raise ImportError(f"{json_file} needs the `tokenizers` package: "
                                  "pip install 'megatron_polar[hf]'") from None
            self._sp = None
            self._hf = Tokenizer.from_file(str(json_file))
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            lookup = self._hf.token_to_id
            default_bos = lookup("<s>")
            self.round_trips = False  # not analysed: the exact (measure, decode) path always
            added = self._hf.get_added_tokens_decoder()
            return (lookup, default_bos, {t.content: i for i, t in added.items() if t.special},
                    {t.content for t in added.values()})
        raise ValueError(f"{self.path}: expected a sentencepiece .model file or a directory "
                         "with tokenizer.model or tokenizer.json")

    special_texts: dict[str, int]
    """Text -> id of every special token that data text can contain: split out by `encode`,
    dropped by `decode`."""
    drop_ids: frozenset[int]
    """The ids `decode` drops (as HF's `skip_special_tokens=True`)."""

    def _special_texts(self, found: dict[str, int]) -> dict[str, int]:
        """The tokenizer's own special tokens (`found`: control and unknown pieces, the added
        special tokens of `tokenizer_config.json` / `tokenizer.json`), plus the POLAR
        separator's text and the text of every special id's piece: text must never yield one of
        those ids, whether or not the tokenizer marks it special."""
        texts = dict(found)
        texts[REWARD_SEPARATOR] = self.separator_id
        # The piece text of every special id: InternLM2 puts `<|im_start|>` on the unused
        # piece `[UNUSED_TOKEN_146]`, whose text sentencepiece would still match.
        for i in set(found.values()) | {self.bos_id, self.separator_id, self.reward_token_id}:
            piece = self.id_to_piece(i)
            if piece and piece not in texts:
                texts[piece] = i
        return {t: i for t, i in texts.items() if t}

    round_trips: bool
    """True when `decode(encode(x)) == x` for every str `x` without "▁" or special-token text
    that has a UTF-8 form, and `token_bound` holds (a sentencepiece model, see `spec_round_trips`)."""

    def _sp_round_trips(self, model: bytes) -> bool:
        try:
            spec = sentencepiece_spec(model)
        except ValueError:
            return False
        sp = self._sp
        space = sp.piece_to_id(SPACE_PIECE)
        # "▁" must be a piece (each space then costs at most one token, and decode strips the
        # dummy prefix from it), and all 256 byte pieces must exist for byte fallback.
        space_ok = (sp.id_to_piece(space) == SPACE_PIECE and not sp.is_unknown(space)
                    and not sp.is_control(space) and not sp.is_unused(space)
                    and not sp.is_byte(space))
        bytes_ok = all(sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256))
        return spec_round_trips(spec) and space_ok and bytes_ok

    def token_bound(self, text: str) -> Optional[int]:
        """An upper bound on `len(encode(text))` for a text that provably round-trips
        (`decode(encode(text)) == text`), or None when neither is guaranteed (a tokenizer that
        does not round-trip, a text containing "▁" — decoded as a space —, special-token text —
        dropped by decode — or one with no UTF-8 form, e.g. a lone surrogate).

        Why `len(text.encode()) + 1` bounds the count: with identity normalisation the
        normalised text is `text` with each " " replaced by "▁" and one "▁" in front (the dummy
        prefix); nothing else changes (empty charsmap, no whitespace removal). The model
        (unigram, BPE, ...; user-defined symbols matched whole) cuts it into pieces of at least
        one character each, and only a character that no piece covers becomes unknown, which
        byte fallback turns into one piece per UTF-8 byte. So a character costs at most its
        UTF-8 length in pieces, and at most one if it is itself a piece: "▁" is (checked), so
        each space costs at most its one byte of `text` and the dummy prefix one more piece.
        """
        if not self.round_trips or SPACE_PIECE in text or self.special_text(text):
            return None
        if not text:
            return 0  # encode("") is []
        try:
            return len(text.encode("utf-8")) + 1
        except UnicodeEncodeError:
            return None

    def _sp_special_texts(self) -> dict[str, int]:
        """Control and unknown pieces (`<s>`, `</s>`, `<unk>`), which an HF tokenizer built on
        this model treats as special tokens, and the special added tokens a directory's
        `tokenizer_config.json` declares (InternLM2 maps `<|im_start|>` and the like onto
        unused pieces there)."""
        sp = self._sp
        texts = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                 if sp.is_control(i) or sp.is_unknown(i)}
        config = self.path / "tokenizer_config.json" if self.path.is_dir() else None
        if config is not None and config.is_file():
            try:
                added = json.loads(config.read_text()).get("added_tokens_decoder") or {}
                for i, token in added.items():
                    if token.get("special") and token.get("content"):
                        texts[token["content"]] = int(i)
            except (ValueError, AttributeError, TypeError) as e:
                raise ValueError(f"{config}: unreadable added_tokens_decoder ({e})") from None
        return texts

    def _unk_id(self) -> Optional[int]:
        if self._sp is not None:
            return self._sp.unk_id()
        unk = getattr(self._hf.model, "unk_token", None)
        return self._hf.token_to_id(unk) if unk else None

    def id_to_piece(self, i: int) -> str:
        if self._sp is not None:
            return self._sp.id_to_piece(i)
        return self._hf.id_to_token(i) or ""

    def special_text(self, text: str) -> Optional[str]:
        """A special token's text found inside `text`, or None."""
        for first, texts in self._by_first_char.items():
            if first in text:
                for t in texts:
                    if t in text:
                        return t
        return None

    def _sp_lookup(self, piece: str) -> Optional[int]:
        i = self._sp.piece_to_id(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i

    def _hf_config(self) -> dict:
        cfg = self.path / "config.json" if self.path.is_dir() else None
        if cfg is not None and cfg.is_file():
            return json.loads(cfg.read_text())
        return {}

    def _resolve(self, name: str, override: Optional[int], found: Optional[int]) -> int:
        value = override if override is not None else found
        if value is None or value < 0:
            how = ("set bos_token_id in the tokenizer directory's config.json" if name == "bos_id"
                   else f"pass it explicitly (--{name.replace('_', '-')})")
            raise ValueError(f"{self.path}: no {name} in the tokenizer; {how}")
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{self.path}: {name} {value} outside the vocabulary of {self.vocab_size}")
        return int(value)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS. Special-token text becomes the token's id and
        splits the text, each piece encoded on its own, as an HF tokenizer does."""
        if not text:
            return []
        if self._split_re is None or self.special_text(text) is None:
            return self._encode_piece(text)
        ids, start = [], 0
        for m in self._split_re.finditer(text):
            if m.start() > start:
                ids += self._encode_piece(text[start:m.start()])
            ids.append(self.special_texts[m.group(0)])
            start = m.end()
        if start < len(text):
            ids += self._encode_piece(text[start:])
        return ids

    def _encode_piece(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        if not self.drop_ids.isdisjoint(ids):
            ids = [i for i in ids if i not in self.drop_ids]
        if not ids:
            return ""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def remove_special_text(self, text: str) -> str:
        """`text` as the released pipeline keeps it: `decode(encode(text))` when it contains
        special-token text (the tokens dropped, each piece after one keeping its own dummy
        prefix), else `text` unchanged."""
        return self.decode(self.encode(text)) if self.special_text(text) else text

    def identity(self) -> TokenizerIdentity:
        """Path and content hash: datasets record it so a run can refuse a mismatched tokenizer."""
        h = hashlib.sha256()
        files = [self.path] if self.path.is_file() else [
            self.path / n for n in _IDENTITY_FILES if (self.path / n).is_file()]
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        h.update(json.dumps(self.special_ids()).encode())
        return TokenizerIdentity(str(self.path.resolve()), h.hexdigest())

    def special_ids(self) -> dict:
        return {"bos_id": self.bos_id, "separator_id": self.separator_id,
                "reward_token_id": self.reward_token_id}
