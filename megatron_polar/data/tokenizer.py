"""Tokenizers for POLAR data: a sentencepiece `.model` file or a Hugging Face tokenizer directory.

The POLAR special ids (the `<|reward|>` separator and the reward token) are inserted as ids by
the encoder, never found by tokenizing their text, so a tokenizer whose vocabulary lacks the
piece still encodes exactly. They come from the tokenizer (piece lookup, `config.json`'s
`reward_token_id`) or from explicit overrides.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REWARD_SEPARATOR = "<|reward|>"
REWARD_TOKEN = "[UNUSED_TOKEN_130]"
# Files whose bytes define a tokenizer's behaviour (hashed into its identity).
_IDENTITY_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


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
        model_file = self.path if self.path.is_file() else self.path / "tokenizer.model"
        json_file = None if self.path.is_file() else self.path / "tokenizer.json"
        if model_file.is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            lookup = self._sp_lookup
            default_bos = self._sp.bos_id()
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
        else:
            raise ValueError(f"{self.path}: expected a sentencepiece .model file or a directory "
                             "with tokenizer.model or tokenizer.json")

        config = self._hf_config()
        self.separator_id = self._resolve("separator_id", separator_id, lookup(REWARD_SEPARATOR))
        self.reward_token_id = self._resolve(
            "reward_token_id", reward_token_id,
            config.get("reward_token_id", lookup(REWARD_TOKEN)))
        self.bos_id = self._resolve("bos_id", bos_id, config.get("bos_token_id", default_bos))
        if self.separator_id == self.reward_token_id:
            raise ValueError(f"{self.path}: separator and reward token share id {self.separator_id}")

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
            raise ValueError(f"{self.path}: no {name} in the tokenizer; pass it explicitly "
                             f"(--{name.replace('_', '-')})")
        if not 0 <= value < self.vocab_size:
            raise ValueError(f"{self.path}: {name} {value} outside the vocabulary of {self.vocab_size}")
        return int(value)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        if not text:
            return []
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`, special tokens skipped."""
        if not ids:
            return ""
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

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
