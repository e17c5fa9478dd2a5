"""The folder rules of docs/architecture.md, checked (issue 20).

- every module does one job in about 600 lines at most;
- no import cycle among the package's modules, deferred imports (inside functions) included:
  a cycle hidden in a function is still two modules that each need the other (only
  ``if TYPE_CHECKING:`` imports, for annotations, do not count);
- the stand-in is a leaf: ``import sae_lens_t5gemma`` and ``register()`` load no stand-in module;
- the README stays a page a newcomer reads in minutes (under 400 lines).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "sae_lens_t5gemma"
MAX_LINES = 620  # "about 600"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules imported anywhere in ``name`` (module level or inside functions), except
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1]
                        + ([base] if base else [])
                    )
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if full in known:
                        found.add(full)
                    elif base in known:
                        found.add(base)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            else:
                for field in ("body", "orelse", "finalbody"):
                    visit([n for n in getattr(node, field, []) if isinstance(n, ast.stmt)])
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    found.discard(name)
    return found


def test_no_module_is_over_about_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert cycles == []


def test_the_stand_in_is_a_leaf():
    code = (
        "import sys, sae_lens_t5gemma\n"
        "from sae_lens_t5gemma.loading.registration import register\n"
        "register()\n"
        "bad = sorted(m for m in sys.modules if 'stand_in' in m or 'synthetic' in m)\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_readme_is_under_400_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) < 400
