"""The house rules, read from the code's own imports, so a change that breaks them fails CI.

- ``common`` imports nothing of fedtune's other folders;
- ``server`` and ``client`` never import each other;
- ``deploy`` imports only ``common``;
- the command line and the simulation (``fedtune/``) sit on top: nothing below imports them;
- no module imports the bare folder names (``common``, ``server``...): only ``fedtune.*``;
- no import cycles between modules; no ``sys.path`` edits anywhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

FOLDERS = {
    "common": "fedtune.common",
    "server": "fedtune.server",
    "client": "fedtune.client",
    "deploy": "fedtune.deploy",
    "fedtune": "fedtune",
}
#: The layer of a module, by its dotted name; "top" is fedtune.cli, fedtune.simulation and the like.
LAYERS = ("common", "server", "client", "deploy")
ALLOWED = {
    "common": {"common"},
    "server": {"common", "server"},
    "client": {"common", "client"},
    "deploy": {"common", "deploy"},
    "top": {"common", "server", "client", "deploy", "top"},
}
BARE = re.compile(r"^(common|server|client|deploy)(\.|$)")


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "top"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    parts = [*FOLDERS[rel.parts[0]].split("."), *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[str]:
    """Every module a file imports, at any depth of its code (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = {
        module_name(p, root): p
        for folder in FOLDERS
        if (root / folder).is_dir()
        for p in (root / folder).rglob("*.py")
        if "__pycache__" not in p.parts and "samples" not in p.parts
    }
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def layer_violations(root: Path) -> list[str]:
    problems = []
    for folder in FOLDERS:
        for path in (root / folder).rglob("*.py") if (root / folder).is_dir() else ():
            importer = module_name(path, root)
            for imported in imports_of(path):
                if BARE.match(imported):
                    problems.append(f"{importer} imports {imported}: use fedtune.{imported}")
                elif imported.startswith("fedtune.") or imported == "fedtune":
                    if imported in ("fedtune",) or layer(imported) in ALLOWED[layer(importer)]:
                        continue
                    problems.append(f"{importer} ({layer(importer)}) imports {imported} ({layer(imported)})")
    return sorted(set(problems))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def without_package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``from fedtune.client import x`` names the package too; a package importing its own child is no cycle."""
    return {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}


SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.(insert|append|extend)\b|\+=|\[[^]]*\]\s*=)")


def sys_path_edits(root: Path) -> list[str]:
    return [
        f"{p.relative_to(root)}:{n}"
        for p in root.rglob("*.py")
        if not {".venv", ".git", "__pycache__", "build"} & set(p.relative_to(root).parts)
        and p.name != Path(__file__).name
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if SYS_PATH_EDIT.search(line)
    ]


def test_each_layer_imports_only_the_layers_below_it():
    assert layer_violations(REPO) == []


def test_no_import_cycles():
    assert cycles(without_package_parents(import_graph(REPO))) == []


def test_no_sys_path_edits_anywhere():
    assert sys_path_edits(REPO) == []


def _house(tmp_path: Path, files: dict[str, str]) -> Path:
    for folder in FOLDERS:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_rules_catch_what_they_forbid(tmp_path):
    root = _house(
        tmp_path,
        {
            "common/low.py": "def f():\n    from fedtune.server import up\n",
            "server/up.py": "import fedtune.client.site\n",
            "client/site.py": "from common.low import f\n",
            "deploy/d.py": "from fedtune.cli import main\n",
            "fedtune/sim.py": "import sys\nsys.path.insert(0, '.')\n",
            "server/a.py": "from fedtune.server.b import x\n",
            "server/b.py": "from fedtune.server.a import y\n",
        },
    )
    problems = layer_violations(root)
    assert any("fedtune.common.low (common) imports fedtune.server" in p for p in problems)
    assert any("fedtune.server.up (server) imports fedtune.client.site (client)" in p for p in problems)
    assert any("fedtune.client.site imports common.low: use fedtune.common.low" in p for p in problems)
    assert any("fedtune.deploy.d (deploy) imports fedtune.cli" in p for p in problems)
    assert ["fedtune.server.a", "fedtune.server.b"] in cycles(without_package_parents(import_graph(root)))
    assert sys_path_edits(root) == ["fedtune/sim.py:2"]
