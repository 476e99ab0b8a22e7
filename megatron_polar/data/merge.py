"""Merge triplet datasets built in partitions into one, in the order given.

`.bin`/`.idx` are concatenated with megatron-core's `IndexedDatasetBuilder.add_index`, so
merging the partitions of a build reproduces the single-process build byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_polar.data.build import DTYPE, FORMAT, output_paths


def read_meta(prefix: str) -> dict:
    path = output_paths(prefix)["meta"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {prefix} a megatron_polar triplet dataset?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def merge_triplets(prefixes: list[str], output_prefix: str) -> dict:
    """Concatenate datasets built with one tokenizer; returns the merged metadata."""
    if not prefixes:
        raise ValueError("nothing to merge")
    metas = [read_meta(p) for p in prefixes]
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        for key in ("tokenizer", "special_ids", "max_length", "max_response_length", "dtype"):
            if meta[key] != first[key]:
                raise ValueError(f"{prefix}: {key} {meta[key]} differs from {prefixes[0]}'s "
                                 f"{first[key]}; only datasets of one build setup can be merged")
    paths = output_paths(output_prefix)
    tmp = {k: p.with_name(p.name + f".tmp{os.getpid()}") for k, p in paths.items()}
    try:
        builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=DTYPE)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(str(tmp["idx"]))
        with open(tmp["rejected"], "wb") as out:
            for prefix in prefixes:
                with open(output_paths(prefix)["rejected"], "rb") as f:
                    shutil.copyfileobj(f, out)
        merged = dict(first)
        for key in ("triplets", "sequences", "tokens", "input_lines", "rejected",
                    "unused_trajectories"):
            merged[key] = sum(m[key] for m in metas)
        merged.update(partition=[0, 1], inputs=[i for m in metas for i in m["inputs"]],
                      merged_from=[str(Path(p)) for p in prefixes])
        merged["inputs"] = list(dict.fromkeys(merged["inputs"]))
        tmp["meta"].write_text(json.dumps(merged, indent=2))
        for kind in ("bin", "idx", "rejected", "meta"):
            os.replace(tmp[kind], paths[kind])
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    return merged
