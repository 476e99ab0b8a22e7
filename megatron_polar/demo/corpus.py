"""The demo's text corpus, read from the sources of two pinned packages the venv has.

The sources are parts of `torch` and `megatron-core`, whose versions requirements/cpu.txt pins
(torch==2.13.0, megatron-core==0.16.1), so the corpus is the same text on every Python 3.11.x
(the standard library's text, used before, changes with the patch release). Only hand-written
sources are read (Python modules, and C++ headers of torch's `c10` library), no generated file;
they are read as text, so CRLF line ends would read the same. torch's own code is
BSD-3-Clause, megatron-core's Apache-2.0; nothing is downloaded.

Three kinds of document, so that policies trained on different ones write differently:
- prose: docstrings of modules, classes and functions (`min_chars` to `max_chars` long);
- code: the source of Python functions (docstrings included);
- cpp: C++ header text, in blocks of whole paragraphs (the license header left out).
Files are read in the order of their paths (as the wheel's RECORD spells them), Python nodes
in the order `ast.walk` visits them: the corpus is a function of the package versions only.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import textwrap
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from megatron_polar.data.records import atomic_file

KINDS = ("prose", "code", "cpp")


@dataclass(frozen=True)
class Source:
    """Sources read from one installed distribution."""

    distribution: str
    version: str  # the version requirements/cpu.txt pins
    prefixes: tuple[str, ...]  # folders of the wheel whose files are read
    language: str  # "python": docstrings -> prose, functions -> code; "cpp": blocks -> cpp
    every: int = 1  # keep every n-th code document (balances the kinds' sizes)


# ~1.4 MB of prose, ~2.1 MB of Python code, ~1.2 MB of C++.
SOURCES = (
    Source("megatron-core", "0.16.1", ("megatron/core",), "python", every=2),
    Source("torch", "2.13.0", ("torch/nn", "torch/optim", "torch/distributions",
                               "torch/autograd"), "python", every=2),
    Source("torch", "2.13.0", ("torch/include/c10/util", "torch/include/c10/core"), "cpp"),
)


def _source_files(source: Source) -> tuple[list[Path], str]:
    """The distribution's files under the source's prefixes (`.py` or C++ headers), in path
    order, and its installed version; warns when that is not the pinned one (the corpus, and
    so every figure of docs/demo.md, would differ)."""
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"the demo corpus reads {source.distribution}=={source.version}'s "
                           "sources, and it is not installed (pip install -r "
                           "requirements/cpu.txt)") from None
    if dist.version.split("+")[0] != source.version:  # torch's local tag (+cpu) is no change
        warnings.warn(f"the demo corpus expects {source.distribution}=={source.version} "
                      f"(requirements/cpu.txt), found {dist.version}: the corpus, and the "
                      "demo's figures, will differ from docs/demo.md")
    suffixes = (".py",) if source.language == "python" else (".h", ".hpp")
    files = []
    for f in dist.files or ():
        rel = f.as_posix() if hasattr(f, "as_posix") else str(f).replace("\\", "/")
        if rel.endswith(suffixes) and any(rel.startswith(p + "/") for p in source.prefixes):
            files.append((rel, Path(dist.locate_file(f))))
    if not files:
        raise RuntimeError(f"no sources of {source.distribution} under {source.prefixes}")
    return [path for _, path in sorted(files)], dist.version


def _python_documents(source_text: str, min_chars: int, max_chars: int):
    """(prose, code) documents of one Python file."""
    try:
        tree = ast.parse(source_text)
    except SyntaxError:
        return [], []
    prose, code = [], []
    lines = source_text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and min_chars <= len(doc) <= max_chars:
                prose.append(doc)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            segment = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
            if min_chars <= len(segment) <= max_chars:
                code.append(segment)
    return prose, code


_LICENSE_WORDS = re.compile(r"copyright|license|licence", re.IGNORECASE)


def _cpp_documents(source_text: str, min_chars: int, max_chars: int) -> list[str]:
    """Blocks of whole paragraphs (split at blank lines) of one header, each at least
    `min_chars` long; a paragraph longer than `max_chars` is left out, and so are paragraphs
    that speak of copyright or licenses."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", source_text)]
    blocks, current = [], ""
    for p in paragraphs:
        if not p.strip() or len(p) > max_chars or _LICENSE_WORDS.search(p):
            continue
        joined = f"{current}\n\n{p}" if current else p
        if len(joined) > max_chars:
            if len(current) >= min_chars:
                blocks.append(current)
            current = p
        else:
            current = joined
        if len(current) >= 4 * min_chars:
            blocks.append(current)
            current = ""
    if len(current) >= min_chars:
        blocks.append(current)
    return blocks


def package_documents(min_chars: int = 200, max_chars: int = 4000,
                      sources=SOURCES) -> dict:
    """{kind: [documents]} for each of KINDS, in a fixed order, and "versions":
    {distribution: installed version}."""
    docs: dict = {kind: [] for kind in KINDS}
    docs["versions"] = {}
    for source in sources:
        files, docs["versions"][source.distribution] = _source_files(source)
        code = []
        for path in files:
            text = path.read_text(encoding="utf-8")  # text mode: universal newlines
            if source.language == "python":
                prose, functions = _python_documents(text, min_chars, max_chars)
                docs["prose"] += prose
                code += functions
            else:
                code += _cpp_documents(text, min_chars, max_chars)
        docs["code" if source.language == "python" else "cpp"] += code[::source.every]
    return docs


def _lines(docs: list[str]):
    for doc in docs:
        yield json.dumps({"text": doc}).encode() + b"\n"


def corpus_digest(docs: dict) -> str:
    """sha256 (16 hex digits) of the corpus files' bytes, in KINDS order."""
    digest = hashlib.sha256()
    for kind in KINDS:
        for line in _lines(docs[kind]):
            digest.update(line)
    return digest.hexdigest()[:16]


def write_corpus(directory: Path, sources=SOURCES) -> dict:
    """Write `{kind}.jsonl` ({"text": ...} per line) for each of KINDS atomically; returns the
    number of characters and documents of each, their digest and the packages' versions."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = package_documents(sources=sources)
    for kind in KINDS:
        with atomic_file(directory / f"{kind}.jsonl") as f:
            for line in _lines(docs[kind]):
                f.write(line)
    return {"characters": {kind: sum(len(d) for d in docs[kind]) for kind in KINDS},
            "documents": {kind: len(docs[kind]) for kind in KINDS},
            "sha256": corpus_digest(docs), "versions": docs["versions"]}


def read_corpus(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]
