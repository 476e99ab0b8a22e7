"""The demo's text corpus, built from text every Python installation has: its standard library.

Two kinds of document, so that policies trained on different mixes write differently:
- prose: docstrings of modules, classes and functions (at least `min_chars` long);
- code: the source of functions (docstrings included), as a programmer's corpus.
The standard library is under the PSF license (permissive); nothing is downloaded. Test suites
and GUI demos are left out. The corpus is about 3 MB and is built in seconds.
"""

from __future__ import annotations

import ast
import json
import sysconfig
import textwrap
from pathlib import Path

from megatron_polar.data.records import atomic_file

SKIPPED_PACKAGES = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo",
                    "ensurepip", "pydoc_data"}


def stdlib_documents(min_chars: int = 200, max_chars: int = 4000) -> dict[str, list[str]]:
    """{"prose": [...], "code": [...]} from the running interpreter's standard library, in a
    fixed order (sorted files, source order within a file)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    prose, code = [], []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in SKIPPED_PACKAGES or "tests" in parts:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            lines = source.splitlines(keepends=True)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are templates or in another encoding: not needed
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and min_chars <= len(doc) <= max_chars:
                    prose.append(doc)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # Whole lines, dedented (ast.get_source_segment re-splits the file per call).
                segment = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
                if min_chars <= len(segment) <= max_chars:
                    code.append(segment)
    code = code[::3]  # every third function: ~2 MB, the size of the prose part's ballpark
    if not prose or not code:
        raise RuntimeError(f"no documents found under {root}: is the standard library installed?")
    return {"prose": prose, "code": code}


def write_corpus(directory: Path) -> dict[str, int]:
    """Write `prose.jsonl` and `code.jsonl` ({"text": ...} per line) atomically; returns the
    number of characters of each."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for kind, docs in stdlib_documents().items():
        with atomic_file(directory / f"{kind}.jsonl") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}).encode() + b"\n")
        sizes[kind] = sum(len(d) for d in docs)
    return sizes


def read_corpus(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]
