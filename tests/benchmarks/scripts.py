"""Import a script of ``benchmarks/`` by path: opacus' wheel installs a top-level package named ``benchmarks``.

A script imports its sibling modules by their bare names (``from harness import ...``), which works when
it runs as ``python benchmarks/NAME.py``: its own folder is then on the import path. Here the siblings a
script imports are loaded by path first and registered in ``sys.modules`` under those bare names, so
that its imports find them; the import path itself is left alone.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


def sibling_imports(path: Path) -> list[str]:
    """The modules of ``benchmarks/`` that the file at ``path`` imports, at any depth of its code."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [name for name in dict.fromkeys(names) if (SCRIPTS / f"{name}.py").is_file()]


def _execute(module_name: str, path: Path) -> ModuleType:
    for sibling in sibling_imports(path):
        load_benchmark_module(sibling)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_benchmark_module(name: str) -> ModuleType:
    """A module the scripts share (``harness``...), registered under the bare name they import it by."""
    path = SCRIPTS / f"{name}.py"
    module = sys.modules.get(name)
    if module is None or Path(getattr(module, "__file__", None) or "").resolve() != path:
        module = _execute(name, path)
    return module


def load_benchmark_script(name: str) -> ModuleType:
    """A script, under a name of its own (``fedtune_benchmark_NAME``), after the modules it imports."""
    module_name = f"fedtune_benchmark_{name}"
    if module_name not in sys.modules:
        _execute(module_name, SCRIPTS / f"{name}.py")
    return sys.modules[module_name]
