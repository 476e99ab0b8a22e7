"""Merge triplet datasets built in partitions into one, in the order given.

`.bin`/`.idx` are concatenated with megatron-core's `IndexedDatasetBuilder.add_index`, so
merging the partitions of a build reproduces the single-process build byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_polar.data.indexed import DTYPE, output_paths, read_meta, staged_outputs


def merge_triplets(prefixes: list[str], output_prefix: str) -> dict:
    """Concatenate datasets built with one tokenizer; returns the merged metadata."""
    if not prefixes:
        raise ValueError("nothing to merge")
    metas = [read_meta(p) for p in prefixes]
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        for key in ("format", "tokenizer", "special_ids", "max_length", "max_response_length",
                    "dtype"):
            if meta[key] != first[key]:
                raise ValueError(f"{prefix}: {key} {meta[key]} differs from {prefixes[0]}'s "
                                 f"{first[key]}; only datasets of one build setup can be merged")
    with staged_outputs(output_prefix) as tmp:
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
                    "unused_trajectories") + (("documents",) if "documents" in first else ()):
            merged[key] = sum(m[key] for m in metas)
        # counted since the encoding follows the released one; older parts lack the key
        merged["special_text_lines"] = sum(m.get("special_text_lines", 0) for m in metas)
        merged.update(partition=[0, 1], inputs=[i for m in metas for i in m["inputs"]],
                      merged_from=[str(Path(p)) for p in prefixes])
        merged["inputs"] = list(dict.fromkeys(merged["inputs"]))
        tmp["meta"].write_text(json.dumps(merged, indent=2))
    return merged
