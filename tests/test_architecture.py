"""The import rules of docs/architecture.md, checked on the source (no imports are run).

- a package imports only packages of lower layers (LAYERS, bottom first; one layer's packages
  do not import each other);
- no module imports a private name (`_x`) of another package, neither `from pkg.mod import _x`
  nor `mod._x` on a module of another package; tools count as a package of their own; tests
  may reach into internals;
- the library never imports `tests` or `tools`, and modules import no cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_polar"

# Bottom first. The entry points `train.py` and `score.py` sit with demo/ in the top layer
# of the library; testing/ (helpers for tests and tools) sits above it.
LAYERS = (
    ("config",),
    ("model",),
    ("data",),
    ("runtime",),
    ("generation", "training"),
    ("convert",),
    ("eval",),
    ("serving",),
    ("demo", "train", "score"),
    ("testing",),
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


class Imports:
    """Every import of one file, resolved to absolute module names, with line numbers."""

    def __init__(self, path: Path, source: str = None, module: str = None):
        self.path = path
        self.module = module or _module_name(path)
        self.is_package = path.name == "__init__.py"
        self.tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
        self.modules: list[tuple[int, str]] = []       # (line, module imported)
        self.names: list[tuple[int, str, str]] = []    # (line, module, name) of from-imports
        self.aliases: dict[str, str] = {}              # local name -> project module it binds
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.modules.append((node.lineno, alias.name))
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                self._from_import(node)

    def _from_import(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.module.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if self.is_package else 0)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        self.modules.append((node.lineno, base))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if _is_module(full):
                self.modules.append((node.lineno, full))
                self.aliases[alias.asname or alias.name] = full
            else:
                self.names.append((node.lineno, base, alias.name))

    def private_attributes(self):
        """(line, module, attribute) for `alias._x` where alias is a project module."""
        for node in ast.walk(self.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in self.aliases and _private(node.attr)):
                yield node.lineno, self.aliases[node.value.id], node.attr


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == PACKAGE:
        return parts[1] if len(parts) > 1 else PACKAGE
    return parts[0]  # tools, tests, or a third-party name


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


LIBRARY = _files(PACKAGE)
SOURCES = {p: Imports(p) for p in LIBRARY + _files("tools")}


def _where(imports: Imports, line: int) -> str:
    return f"{imports.path.relative_to(ROOT)}:{line}"


def test_every_library_package_has_a_layer():
    packages = {_package_of(_module_name(p)) for p in LIBRARY} - {PACKAGE}
    assert packages <= set(RANK), (
        f"packages without a layer: {sorted(packages - set(RANK))}; add them to LAYERS here "
        f"and to the table of docs/architecture.md")


def test_packages_import_only_lower_layers():
    wrong = []
    for path in LIBRARY:
        imports = SOURCES[path]
        own = _package_of(imports.module)
        for line, module in imports.modules:
            other = _package_of(module)
            if module.split(".")[0] in ("tests", "tools"):
                wrong.append(f"{_where(imports, line)}: the library imports {module}")
            elif (module.startswith(PACKAGE + ".") and other != own and own in RANK
                    and RANK.get(other, -1) >= RANK[own]):
                wrong.append(f"{_where(imports, line)}: {own} (layer {RANK[own]}) imports "
                             f"{module} (layer {RANK.get(other)})")
    assert not wrong, "import rules of docs/architecture.md broken:\n" + "\n".join(wrong)


def test_no_private_names_cross_packages():
    wrong = []
    for imports in SOURCES.values():
        own = _package_of(imports.module)
        found = [(line, module, name) for line, module, name in imports.names if _private(name)]
        found += list(imports.private_attributes())
        for line, module, name in found:
            if module.startswith(PACKAGE + ".") and _package_of(module) != own:
                wrong.append(f"{_where(imports, line)}: {module}.{name} is private to "
                             f"{_package_of(module)}/; make it public or move it")
    assert not wrong, "\n".join(wrong)


def test_library_modules_import_no_cycle():
    graph = {}
    for path in LIBRARY:
        imports = SOURCES[path]
        graph[imports.module] = {m for _, m in imports.modules
                                 if m.startswith(PACKAGE + ".") and m != imports.module
                                 and not imports.module.startswith(m + ".")}
    state, cycle = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle.extend(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, trail + [nxt]):
                return True
        state[node] = "done"
        return False

    for node in sorted(graph):
        if node not in state and visit(node, [node]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, rule", [
    ("from megatron_polar.serving.server import RewardServer\n", "lower layers"),
    ("from megatron_polar.training.step import _helper\n", "private"),
    ("from megatron_polar.training import step\nstep._helper()\n", "private"),
    ("import tests.conftest\n", "lower layers"),
])
def test_the_checks_catch_a_broken_rule(monkeypatch, source, rule):
    """The checks above fail on a data/ module that breaks a rule (guards against a check that
    silently passes, e.g. after a change of the layout)."""
    path = ROOT / PACKAGE / "data" / "encoding.py"
    monkeypatch.setitem(SOURCES, path, Imports(path, source, f"{PACKAGE}.data.encoding"))
    check = (test_packages_import_only_lower_layers if rule == "lower layers"
             else test_no_private_names_cross_packages)
    with pytest.raises(AssertionError):
        check()
