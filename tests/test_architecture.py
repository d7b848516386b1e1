"""The package's layout rule (docs/architecture.md), read from the source with ``ast``.

Wings, lowest first; a module may import its own wing and the wings below it, never one beside
or above it:

    core (0)  <  arithmetic (1)  <  training (2), serving (2)  <  evaluate (3), hub (3)  <  cli, demo

``errors``, ``progress``, ``quiet`` and the package's ``__version__`` are leaves any module may import (and
they import nothing of the package). Every import counts, lazy ones inside functions included.
The module graph must also have no loop, within a wing or across wings.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "lora_unlearn"
RANK = {"core": 0, "arithmetic": 1, "training": 2, "serving": 2, "evaluate": 3, "hub": 3}
TOP = {"cli", "demo"}  # and the package's own __init__ (the public API): may import anything
TOP_PACKAGES = {"cli"}  # the top modules that are packages (cli/: the commands, split by concern)
LEAVES = {"errors", "progress", "quiet"}
LEAF_NAMES = {"__version__"}  # what may be imported from the package root itself


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    file: str
    line: int
    text: str  # the import as written
    targets: tuple[str, ...]  # modules it loads, dotted (resolved)
    names: tuple[str, ...]  # for `from X import a, b`: a, b


def _modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(root: Path, package: str) -> list[Import]:
    modules = _modules(root, package)
    found = []
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(tree):  # every node: imports inside functions count too
            if isinstance(node, ast.Import):
                targets = tuple(a.name for a in node.names if a.name.split(".")[0] == package)
                names: tuple[str, ...] = ()
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != package:
                    continue
                names = tuple(a.name for a in node.names)
                # `from pkg import sub` loads pkg.sub when it is a module; otherwise pkg itself
                subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
                targets = tuple(subs) if len(subs) == len(names) else (module, *subs)
            else:
                continue
            if targets:
                found.append(Import(name, str(path.relative_to(root.parent)), node.lineno,
                                    ast.get_source_segment(text, node) or "", targets, names))
    return found


def _wing(module: str, package: str) -> str:
    """core | arithmetic | ... | top | leaf | root (the package's __init__)."""
    parts = module.split(".")
    if parts == [package]:
        return "root"
    first = parts[1]
    if first in RANK:
        return first
    if first in LEAVES:
        return "leaf"
    return "top"


def _allowed(src: str, dst: str, imp: Import) -> bool:
    if dst == "leaf" or (dst == "root" and imp.names and set(imp.names) <= LEAF_NAMES):
        return True
    if src in ("top", "root"):
        return True
    if src == "leaf" or dst in ("top", "root"):
        return False
    return dst == src or RANK[dst] < RANK[src]


def direction_violations(root: Path, package: str) -> list[str]:
    """One line per import against the direction: file:line, the import, and what that wing may import."""
    bad = []
    for imp in _imports(root, package):
        src = _wing(imp.source, package)
        for target in imp.targets:
            dst = _wing(target, package)
            if not _allowed(src, dst, imp):
                may = sorted({w for w, r in RANK.items() if src in RANK and (w == src or r < RANK[src])})
                bad.append(f"{imp.file}:{imp.line}: `{imp.text}` imports {target} ({dst}) from {src}; "
                           f"{src} may import only {', '.join(may) or 'nothing of the package'} "
                           f"and the leaves {', '.join(sorted(LEAVES))}, __version__")
    return bad


def import_loops(root: Path, package: str) -> list[str]:
    """One line per loop in the module graph (Tarjan's strongly connected components), with an example cycle."""
    graph: dict[str, set[str]] = {m: set() for m in _modules(root, package)}
    where: dict[tuple[str, str], Import] = {}
    for imp in _imports(root, package):
        for target in imp.targets:
            if target in graph and target != imp.source:
                graph[imp.source].add(target)
                where.setdefault((imp.source, target), imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    loops = []
    for component in components:
        cycle = _cycle(graph, set(component), component[0])
        steps = [f"{where[(a, b)].file}:{where[(a, b)].line} `{where[(a, b)].text}`" for a, b in itertools.pairwise(cycle)]
        loops.append(f"import loop {' -> '.join(cycle)}: " + "; ".join(steps))
    return loops


def _cycle(graph: dict[str, set[str]], members: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected component (breadth first)."""
    previous: dict[str, str] = {}
    queue = [start]
    for v in queue:
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is not on a cycle")


# ---- the package ----------------------------------------------------------------------------------

def test_package_imports_follow_the_direction():
    assert direction_violations(PACKAGE_ROOT, "lora_unlearn") == []


def test_package_has_no_import_loops():
    assert import_loops(PACKAGE_ROOT, "lora_unlearn") == []


def test_every_module_is_in_a_wing_or_named_at_the_top():
    """A new module lands in a wing; only the named top-level modules (files, or cli/) sit beside them."""
    top = {p.stem for p in PACKAGE_ROOT.glob("*.py")}
    assert top == (TOP - TOP_PACKAGES) | LEAVES | {"__init__"}
    packages = {p.name for p in PACKAGE_ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(RANK) | TOP_PACKAGES


def _long_functions(root: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # decorators not counted, docstring counted
                if length > limit:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_serving_modules_and_functions_stay_small():
    """The server was one 601-line file with a 178-line create_app; the issue's limits keep it split."""
    serving = PACKAGE_ROOT / "serving"
    long_files = [f"{p.name}: {n}" for p in sorted(serving.glob("*.py"))
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450]
    assert long_files == []
    assert _long_functions(serving, 80) == []


def test_cli_modules_stay_small():
    """cli.py grew to 768 lines; split by concern (cli/), no command module is over 300 lines."""
    long_files = [f"{p.name}: {n}" for p in sorted((PACKAGE_ROOT / "cli").glob("*.py"))
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > 300]
    assert long_files == []


def test_public_api_names_resolve():
    """``lora_unlearn.__init__`` maps names to modules as strings, which ast does not follow: resolve each."""
    import lora_unlearn

    missing = [name for name in lora_unlearn.__all__ if getattr(lora_unlearn, name, None) is None]
    assert missing == []
    assert lora_unlearn.scale is lora_unlearn.arithmetic.scale  # one scale, defined in core, re-exported


def test_the_checker_reads_the_real_tree():
    """Guards against a checker that passes because it saw nothing."""
    imports = _imports(PACKAGE_ROOT, "lora_unlearn")
    seen = {(i.source, t) for i in imports for t in i.targets}
    assert ("lora_unlearn.core.stack", "lora_unlearn.core.adapter") in seen
    assert ("lora_unlearn.hub.export", "lora_unlearn.serving.runtime") in seen  # a lazy import inside a function
    assert len(imports) > 100


# ---- the checker on a synthetic tree ----------------------------------------------------------------

def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in (root / "pkg").rglob("*.py")} | {root / "pkg"}:
        (folder / "__init__.py").touch()
    return root / "pkg"


GOOD = {
    "errors.py": "class UserError(Exception):\n    pass\n",
    "core/a.py": "from ..errors import UserError\nfrom .. import __version__\n",
    "core/b.py": "from .a import UserError\n",
    "arithmetic/ops.py": "from ..core.b import UserError\n",
    "training/t.py": "from ..arithmetic import ops\nfrom ..core import a\n",
    "serving/s.py": "from ..arithmetic.ops import UserError\n",
    "hub/h.py": "def f():\n    from ..serving.s import UserError\n    return UserError\n",
    "cli.py": "from .hub import h\nfrom .training import t\n",
}


def test_checker_passes_a_tree_that_follows_the_rules(tmp_path):
    root = _tree(tmp_path, GOOD)
    assert direction_violations(root, "pkg") == []
    assert import_loops(root, "pkg") == []


def test_checker_names_the_file_and_the_import_against_the_direction(tmp_path):
    root = _tree(tmp_path, {**GOOD,
                            "core/a.py": "def lazy():\n    from ..serving import s\n",  # lazy, upwards
                            "training/t.py": "from ..serving.s import UserError\n",  # sideways
                            "arithmetic/ops.py": "from .. import cli\n"})  # the top
    bad = direction_violations(root, "pkg")
    assert len(bad) == 3, bad
    assert any(line.startswith("pkg/core/a.py:2: `from ..serving import s` imports pkg.serving.s (serving) from core")
               for line in bad), bad
    assert any(line.startswith("pkg/training/t.py:1:") and "(serving) from training" in line for line in bad), bad
    assert any(line.startswith("pkg/arithmetic/ops.py:1:") and "pkg.cli (top)" in line for line in bad), bad


def test_checker_finds_a_loop_within_a_wing(tmp_path):
    root = _tree(tmp_path, {**GOOD, "core/a.py": "def f():\n    from .b import UserError\n",
                            "core/b.py": "from .a import f\n"})
    assert direction_violations(root, "pkg") == []  # same wing: allowed by direction, caught as a loop
    loops = import_loops(root, "pkg")
    assert len(loops) == 1
    assert loops[0].startswith("import loop pkg.core.a -> pkg.core.b -> pkg.core.a: pkg/core/a.py:2"), loops


def test_checker_refuses_leaves_that_import_the_package(tmp_path):
    root = _tree(tmp_path, {**GOOD, "progress.py": "from .core import a\n"})
    bad = direction_violations(root, "pkg")
    assert len(bad) == 1 and bad[0].startswith("pkg/progress.py:1:"), bad


def test_long_function_check_sees_nested_and_async_functions(tmp_path):
    body = "".join(f"        x{i} = {i}\n" for i in range(80))
    root = _tree(tmp_path, {"serving/app.py": f"def make():\n    async def route():\n{body}    return route\n"})
    assert _long_functions(root, 80) == ["pkg/serving/app.py:1 make (83 lines)", "pkg/serving/app.py:2 route (81 lines)"]
    assert _long_functions(root, 83) == []



def test_every_benchmark_and_script_compiles(tmp_path):
    """Benchmarks are scripts no test imports: a syntax error (benchmarks/tofu_mini.py once had one, a
    `global` after the name's first use) would only show when someone runs them."""
    import py_compile

    repo = Path(__file__).resolve().parent.parent
    scripts = sorted(repo.glob("benchmarks/*.py")) + sorted(repo.glob("adapters/*.py"))
    assert len(scripts) >= 10
    for script in scripts:
        py_compile.compile(str(script), doraise=True, cfile=str(tmp_path / f"{script.stem}.pyc"))
