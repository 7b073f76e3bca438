"""The shape of the library, checked: no import cycles, no private names across modules, small modules.

Imports are read from the source (every ``import`` anywhere in a module, also
inside functions, where this codebase defers heavy ones), so a cycle hidden
behind a function-level import counts as one too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("umtam", "umtam_cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement of the file, TYPE_CHECKING ones aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checking_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                     for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def internal_edges() -> dict[str, set[str]]:
    """module -> the umtam modules it imports (``from umtam import resume`` names the module resume)."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, names in imports_of(path):
            for candidate in [target, *(f"{target}.{item}" for item in names)]:
                if candidate in MODULES and candidate != name:
                    edges[name].add(candidate)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None. A package importing its own submodules is no cycle."""
    def follows(source: str, target: str) -> bool:
        return not target.startswith(source + ".")  # umtam.tasks -> umtam.tasks.glue registers, and back

    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if not follows(node, target):
                continue
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(internal_edges()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.q"}, "p.q": {"p"}}) is None  # a package registering its submodule


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{name} imports {item} from {target}" for name, path in MODULES.items()
                 for target, names in imports_of(path) if target.split(".")[0] in PACKAGES
                 for item in names if item.startswith("_") and not item.startswith("__")]
    offenders += [f"{name} imports the private module {target}" for name, path in MODULES.items()
                  for target, _ in imports_of(path)
                  if target.split(".")[0] in PACKAGES and any(part.startswith("_") and not part.startswith("__")
                                                              for part in target.split("."))]
    assert offenders == []


def test_bench_scripts_use_public_names_only():
    offenders = [f"{path.name} imports {item} from {target}" for path in sorted((ROOT / "bench").glob("*.py"))
                 for target, names in imports_of(path) if target.split(".")[0] in PACKAGES
                 for item in names if item.startswith("_") and not item.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("module, most", [("umtam.merge.engine", 450), ("umtam.checkpoint", 300)])
def test_the_split_modules_stay_small(module, most):
    assert len(MODULES[module].read_text().splitlines()) < most


def test_prune_does_not_reach_into_the_merge_engine():
    assert not any(target.startswith("umtam.merge") for target in internal_edges()["umtam.prune"])


def test_reading_the_options_of_every_command_and_method_does_not_import_torch():
    """The CLI builds its flags from the schemas and registries; --help and completion stay fast."""
    probe = ("import sys\n"
             "import umtam_cli.cmd_train, umtam_cli.cmd_prune, umtam_cli.cmd_merge, umtam_cli.cmd_eval, "
             "umtam_cli.cmd_inspect\n"
             "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"
