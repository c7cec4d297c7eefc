"""The package layout is the architecture: layers import only downward, no import cycles, no private imports across
modules, few top-level modules, and a README that is a front door linking every docs page."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# Bottom to top. A module may import from its own unit or from any unit in a lower layer; units that share a layer
# (digits, sd) may not import each other.
LAYERS = [
    {"errors"},
    {"config"},
    {"diffusion"},
    {"evaluation"},
    {"models"},
    {"digits", "sd"},
    {"preferences"},
    {"tasks"},
    {"methods"},
    {"training"},
    {"blackbox"},
    {"bench"},
    {"cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
DOCS_PAGES = ("tasks", "methods", "continuous_time", "sd", "blackbox", "bench", "devices", "architecture", "api")


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in (SRC / "sqdf").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _imports(module: str, path: Path, is_pkg: bool, modules) -> list[tuple[str, str | None, int]]:
    """(imported sqdf module, imported name or None, line) for every import statement, function-level ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "sqdf"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sqdf":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def _graph():
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    names: list[tuple[str, str, str, int]] = []
    for module, (path, is_pkg) in modules.items():
        for target, name, line in _imports(module, path, is_pkg, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != module:
                edges[module].add(target)
            if name is not None:
                names.append((module, target, name, line))
    return modules, edges, names


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    _, edges, _ = _graph()
    assert _cycles(edges) == []


def test_every_package_is_in_a_layer():
    modules, _, _ = _graph()
    units = {_unit(m) for m in modules} - {"__init__"}
    assert units <= set(RANK), f"add {sorted(units - set(RANK))} to LAYERS in tests/test_layout.py"


def test_layers_import_only_downward():
    _, edges, _ = _graph()
    upward = []
    for module, targets in edges.items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a == b or "__init__" in (a, b):
                continue
            if RANK[b] >= RANK[a]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_private_names_imported_across_modules():
    _, _, names = _graph()
    private = [f"{m}:{line} imports {name} from {t}" for m, t, name, line in names if name.startswith("_") and t != m]
    assert private == []


def test_at_most_four_top_level_modules():
    top = sorted(p.name for p in (SRC / "sqdf").glob("*.py"))
    assert len(top) <= 4, top


def test_tests_mirror_the_package_layout():
    packages = {p.name for p in (SRC / "sqdf").iterdir() if (p / "__init__.py").exists()}
    test_dirs = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert test_dirs - packages <= {"benchmarks"}, f"test folders without a package: {sorted(test_dirs - packages)}"


def test_readme_is_a_front_door():
    readme = (REPO / "README.md").read_text()
    lines = readme.splitlines()
    assert len(lines) <= 210, f"README.md has {len(lines)} lines; move detail to docs/"
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block[0].endswith("sqdf train digits") and block[1] == "python -m pytest -q"
    for page in DOCS_PAGES:
        assert f"docs/{page}.md" in readme, f"README.md does not link docs/{page}.md"


@pytest.mark.parametrize("doc", ["README.md", *[f"docs/{p}.md" for p in DOCS_PAGES]])
def test_relative_links_resolve(doc):
    path = REPO / doc
    assert path.exists(), f"{doc} is missing"
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        if not (path.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert broken == [], f"{doc}: broken links {broken}"


def test_no_tracked_logs():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True)
    assert [f for f in tracked.stdout.split() if f.endswith(".log")] == []
