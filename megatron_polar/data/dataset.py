"""Reading built triplet datasets: validation, blending, train/valid split, epoch shuffles.

`TripletStream` is an endless, deterministic sequence of pairs: position n always names the
same pair, so a sampler that records its position resumes exactly. Blending follows megatron's
own `build_blending_indices` (largest-deficit first); each dataset is read in a fresh
permutation every epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
from megatron.core.datasets import helpers_cpp
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_polar.data.indexed import FORMAT_LISTS, output_paths, read_meta
from megatron_polar.data.packing import PrefixItem, common_prefix_length


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the file."""


class TripletDataset:
    """One built dataset of documents: a triplet's (s+ ids, s- ids), or (FORMAT_LISTS) a
    ranked list's candidates best first, whose every ordered pair i < j is a triplet."""

    def __init__(self, prefix: str, expected_tokenizer_sha256: Optional[str] = None):
        self.prefix = prefix
        paths = output_paths(prefix)
        for kind in ("bin", "idx"):
            if not paths[kind].is_file():
                raise DatasetError(f"{paths[kind]}: missing")
        try:
            self.meta = read_meta(prefix)
        except (FileNotFoundError, ValueError) as e:
            raise DatasetError(str(e)) from None
        try:
            self.data = IndexedDataset(prefix)
        except Exception as e:  # megatron raises assorted errors on a damaged index
            raise DatasetError(f"{paths['idx']}: cannot be read ({e})") from None
        lengths = self.data.sequence_lengths.astype(np.int64)
        itemsize = np.dtype(self.data.index.dtype).itemsize
        expected_bytes = int(lengths.sum()) * itemsize
        actual = os.path.getsize(paths["bin"])
        if actual != expected_bytes:
            raise DatasetError(f"{paths['bin']}: {actual} bytes, the index describes "
                               f"{expected_bytes}; the .bin and .idx do not belong together "
                               "or one is truncated")
        docs = np.asarray(self.data.document_indices, dtype=np.int64)
        sizes = np.diff(docs)
        self.lists = self.meta["format"] == FORMAT_LISTS
        if len(docs) < 1 or docs[0] != 0 or docs[-1] != len(lengths):
            raise DatasetError(f"{paths['idx']}: document boundaries do not cover the sequences")
        if not self.lists and (sizes != 2).any():
            raise DatasetError(f"{paths['idx']}: documents are not pairs of sequences")
        if self.lists and (sizes < 2).any():
            raise DatasetError(f"{paths['idx']}: a ranked list of fewer than two candidates")
        self.doc_starts, self.doc_sizes = docs[:-1], sizes
        self.document_pairs = sizes * (sizes - 1) // 2
        n = int(self.document_pairs.sum())
        if n != self.meta["triplets"]:
            raise DatasetError(f"{paths['meta']}: says {self.meta['triplets']} triplets, "
                               f"the index holds {n}")
        if expected_tokenizer_sha256 is not None and \
                self.meta["tokenizer"]["sha256"] != expected_tokenizer_sha256:
            raise DatasetError(
                f"{prefix}: built with tokenizer {self.meta['tokenizer']['path']} "
                f"(sha256 {self.meta['tokenizer']['sha256'][:12]}), not this run's "
                f"(sha256 {expected_tokenizer_sha256[:12]})")
        # tokens of each document's sequences (a pair's two; a list's candidates, each once)
        cumulative = np.concatenate([[0], np.cumsum(lengths)])
        self.document_lengths = cumulative[docs[1:]] - cumulative[docs[:-1]]
        # Common prefix of each document's sequences, found on first use (-1: not yet): a
        # shared-prefix pack computes it once. Existing datasets need no rebuild.
        self._prefix_lengths = np.full(len(sizes), -1, dtype=np.int32)

    def prefix_length(self, i: int) -> int:
        """`common_prefix_length` of document i's sequences, read once and cached."""
        if self._prefix_lengths[i] < 0:
            self._prefix_lengths[i] = common_prefix_length(self.document(i))
        return int(self._prefix_lengths[i])

    def shared_prefix_length(self, i: int) -> int:
        """Tokens document i takes in a shared-prefix pack: its sequences, their common
        prefix once (each sequence keeps at least its last token of its own)."""
        return (int(self.document_lengths[i])
                - (int(self.doc_sizes[i]) - 1) * self.prefix_length(i))

    def __len__(self) -> int:
        """Documents (triplets, or ranked lists)."""
        return len(self.doc_sizes)

    def document(self, i: int) -> list[np.ndarray]:
        start = int(self.doc_starts[i])
        return [self.data[start + k] for k in range(int(self.doc_sizes[i]))]

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.doc_sizes[i] != 2:
            raise DatasetError(f"{self.prefix}: document {i} is a ranked list of "
                               f"{self.doc_sizes[i]} candidates, not a pair")
        start = int(self.doc_starts[i])
        return self.data[start], self.data[start + 1]


@dataclass(frozen=True)
class BlendSpec:
    prefixes: Sequence[str]
    weights: Sequence[float]

    @classmethod
    def parse(cls, data_path: Sequence[str]) -> "BlendSpec":
        """Megatron's `--data-path`: `PREFIX` or `W1 PREFIX1 W2 PREFIX2 ...`."""
        if len(data_path) == 1:
            return cls([data_path[0]], [1.0])
        if len(data_path) % 2:
            raise ValueError("--data-path takes one prefix or weight/prefix pairs")
        try:
            weights = [float(w) for w in data_path[0::2]]
        except ValueError:
            raise ValueError("--data-path with several datasets is WEIGHT PREFIX WEIGHT PREFIX ...") from None
        if any(w <= 0 for w in weights):
            raise ValueError("--data-path weights must be positive")
        return cls(list(data_path[1::2]), weights)


class TripletStream:
    """Deterministic endless stream of pairs over blended datasets, for one split."""

    def __init__(self, blend: BlendSpec, split: str = "train", valid_fraction: float = 0.0,
                 seed: int = 1234, expected_tokenizer_sha256: Optional[str] = None):
        if split not in ("train", "valid"):
            raise ValueError(f"split must be train or valid, got {split!r}")
        self.datasets = [TripletDataset(p, expected_tokenizer_sha256) for p in blend.prefixes]
        self.seed = seed
        # A fixed permutation per dataset decides the split; epochs then shuffle within it.
        self.members = []
        for d, ds in enumerate(self.datasets):
            perm = np.random.default_rng([seed, d, 0xD1]).permutation(len(ds))
            n_valid = int(round(valid_fraction * len(ds)))
            chosen = perm[len(ds) - n_valid:] if split == "valid" else perm[: len(ds) - n_valid]
            if len(chosen) == 0:
                raise DatasetError(f"{ds.prefix}: no pairs in the {split} split")
            self.members.append(np.sort(chosen))
        weights = np.asarray(blend.weights, dtype=np.float64)
        weights /= weights.sum()
        # One blending cycle holds about as many pairs as the datasets; the pattern repeats.
        self.cycle = max(sum(len(m) for m in self.members), len(self.members))
        self.dataset_index = np.zeros(self.cycle, dtype=np.int16)
        self.sample_index = np.zeros(self.cycle, dtype=np.int64)
        helpers_cpp.build_blending_indices(self.dataset_index, self.sample_index, weights,
                                           len(self.members), self.cycle, False)
        self.per_cycle = np.bincount(self.dataset_index, minlength=len(self.members))

    @lru_cache(maxsize=64)
    def _epoch_order(self, d: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, d, epoch])
        return self.members[d][rng.permutation(len(self.members[d]))]

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset, pair index) at a stream position."""
        cycle, offset = divmod(position, self.cycle)
        d = int(self.dataset_index[offset])
        k = cycle * int(self.per_cycle[d]) + int(self.sample_index[offset])
        epoch, j = divmod(k, len(self.members[d]))
        return d, int(self._epoch_order(d, epoch)[j])

    def length(self, position: int) -> int:
        """Tokens of the document's sequences (a pair's two, a list's candidates)."""
        d, i = self.locate(position)
        return int(self.datasets[d].document_lengths[i])

    def pairs_at(self, position: int) -> int:
        """Ordered pairs (triplets) of the document: 1 for a pair."""
        d, i = self.locate(position)
        return int(self.datasets[d].document_pairs[i])

    @property
    def has_lists(self) -> bool:
        return any(ds.lists for ds in self.datasets)

    def shared_prefix_length(self, position: int) -> int:
        d, i = self.locate(position)
        return self.datasets[d].shared_prefix_length(i)

    def prefix_item(self, position: int) -> PrefixItem:
        """The document as a shared-prefix item (a pair or a ranked list: every ordered
        pair), its common prefix taken from the dataset's cache."""
        d, i = self.locate(position)
        seqs = [seq.tolist() for seq in self.datasets[d].document(i)]
        return PrefixItem.from_ranking(seqs, self.datasets[d].prefix_length(i))

    def pair(self, position: int) -> tuple[list[int], list[int]]:
        d, i = self.locate(position)
        pos, neg = self.datasets[d].pair(i)
        return pos.tolist(), neg.tolist()
