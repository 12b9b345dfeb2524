"""The package's layout rules, checked on the source (nothing is imported).

Import directions (the README's package tour): the shared layers never import the role
packages, the two roles never import each other, and only the CLI imports the CLI. Sizes: a
module stays within 400 lines and a function within 80, unless a ``# long: <reason>`` comment
says why (on the ``def`` line for a function, in the first 5 lines for a module).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fedtrain"
ROOT = PACKAGE.parent

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG = re.compile(r"#\s*long:\s*\S")

SHARED = (
    "strategies",
    "aggregation",
    "transport",
    "protocol",
    "storage",
    "models",
    "data",
    "config",
    "runtime",
    "optim",
)
ROLES = ("server", "client", "simulation", "cli")

# (importing package, imported package) -> why it is not allowed; "*" = any package.
FORBIDDEN: dict[tuple[str, str], str] = {
    **{(low, role): "shared layers never import a role" for low in SHARED for role in ROLES},
    ("server", "client"): "server and client never import each other",
    ("client", "server"): "server and client never import each other",
    ("server", "simulation"): "the deployment never imports the simulation",
    ("run", "simulation"): "the run assembly is handed its engine; it never builds one",
    ("run", "client"): "the run assembly is handed its engine; it never builds one",
    ("*", "cli"): "nothing imports the CLI but the CLI",
}


@dataclass(frozen=True)
class Import:
    """One reference from a module of the package to a module under ``fedtrain.``."""

    file: Path
    line: int
    target: str


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str) -> str:
    """``fedtrain.server.round`` -> ``server``; the top-level package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _resolve(path: Path, node: ast.ImportFrom, root: Path) -> list[str]:
    """Absolute module names an ``ImportFrom`` refers to (each imported name may be a module)."""
    if node.level:
        base = _module_name(path, root).split(".")
        if path.name != "__init__.py":
            base.pop()  # a module's package
        base = base[: len(base) - (node.level - 1)]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    return [module] + [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]


def _lazy_targets(tree: ast.AST) -> list[tuple[int, str]]:
    """``fedtrain.x`` strings in ``_WHERE`` maps, ``lazy(...)`` calls and ``import_module(...)``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        holders: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            named = any(isinstance(t, ast.Name) and t.id == "_WHERE" for t in targets)
            if named and node.value is not None:
                holders.append(node.value)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in ("lazy", "import_module", "__import__"):
                holders.extend(node.args)
        for holder in holders:
            for const in ast.walk(holder):
                if (
                    isinstance(const, ast.Constant)
                    and isinstance(const.value, str)
                    and (const.value == "fedtrain" or const.value.startswith("fedtrain."))
                ):
                    found.append((const.lineno, const.value))
    return found


def _imports(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import of a ``fedtrain`` module in ``path``, at any depth (functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [Import(path, node.lineno, name) for name in _resolve(path, node, root)]
    out += [Import(path, line, target) for line, target in _lazy_targets(tree)]
    return [i for i in out if i.target == "fedtrain" or i.target.startswith("fedtrain.")]


def _why_forbidden(source: str, target: str) -> str | None:
    if source == target:
        return None
    return FORBIDDEN.get((source, target)) or FORBIDDEN.get(("*", target))


def test_import_directions() -> None:
    found: dict[tuple[str, int, str], str] = {}  # one entry per (file, line, imported package)
    for path in _modules():
        source = _package_of(_module_name(path))
        for imp in _imports(path):
            target = _package_of(imp.target)
            why = _why_forbidden(source, target)
            key = (_rel(path), imp.line, target)
            if why and (key not in found or len(imp.target) < len(found[key].split()[2])):
                found[key] = f"{key[0]}:{imp.line}: {source} imports {imp.target} ({why})"
    violations = list(found.values())
    assert not violations, f"{len(violations)} import(s) against the layout rules:\n" + "\n".join(
        sorted(violations, key=_by_file_line)
    )


def _by_file_line(entry: str) -> tuple[str, int]:
    file, line, _ = entry.split(":", 2)
    return file, int(line)


def test_module_sizes() -> None:
    violations = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_MODULE_LINES and not any(LONG.search(x) for x in lines[:5]):
            violations.append(f"{_rel(path)}:1: {len(lines)} lines > {MAX_MODULE_LINES}")
    assert not violations, (
        f"{len(violations)} module(s) over {MAX_MODULE_LINES} lines (split them, or put "
        "'# long: <reason>' in the first 5 lines):\n" + "\n".join(violations)
    )


def test_function_sizes() -> None:
    violations = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not LONG.search(lines[node.lineno - 1]):
                violations.append(
                    f"{_rel(path)}:{node.lineno}: {node.name} is {length} lines "
                    f"> {MAX_FUNCTION_LINES}"
                )
    violations.sort(key=_by_file_line)
    assert not violations, (
        f"{len(violations)} function(s) over {MAX_FUNCTION_LINES} lines (split them, or put "
        "'# long: <reason>' on the def line):\n" + "\n".join(violations)
    )


def test_rules_see_every_kind_of_import(tmp_path: Path) -> None:
    """The walk finds imports inside functions, relative imports and lazy-map strings."""
    pkg = tmp_path / "fedtrain" / "strategies"
    pkg.mkdir(parents=True)
    module = pkg / "x.py"
    module.write_text(
        "def f():\n"
        "    from ..server import coordinator\n"
        "    import fedtrain.client.worker\n"
        "_WHERE = {'A': 'fedtrain.simulation.clock'}\n"
        "__getattr__ = lazy(__name__, {'B': 'fedtrain.cli.main'})\n",
        encoding="utf-8",
    )
    assert _package_of(_module_name(module, tmp_path)) == "strategies"
    targets = {_package_of(i.target) for i in _imports(module, tmp_path)}
    assert {"server", "client", "simulation", "cli"} <= targets
    assert _why_forbidden("strategies", "server")
    assert _why_forbidden("run", "cli")
    assert _why_forbidden("cli", "cli") is None
    assert _why_forbidden("simulation", "server") is None
