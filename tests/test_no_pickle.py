"""No code execution from data: no pickle, torch.load only with weights_only=True, no remote code."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("umtam", "umtam_cli")]


def python_files():
    for package in PACKAGES:
        yield from sorted(package.rglob("*.py"))


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_no_module_imports_pickle():
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            offenders += [f"{path.name}: {name}" for name in names if name.split(".")[0] in ("pickle", "dill", "cloudpickle")]
    assert offenders == []


def test_torch_load_always_passes_weights_only_true():
    offenders = []
    for path in python_files():
        for call in calls(ast.parse(path.read_text())):
            if dotted(call.func).endswith("torch.load"):
                flags = {kw.arg: kw.value for kw in call.keywords}
                value = flags.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.name}:{call.lineno}")
    assert offenders == []


def test_remote_code_is_never_trusted():
    offenders = []
    for path in python_files():
        for call in calls(ast.parse(path.read_text())):
            for keyword in call.keywords:
                if keyword.arg == "trust_remote_code" and not (
                        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
                    offenders.append(f"{path.name}:{call.lineno}")
    assert offenders == []


def test_the_checks_would_catch_an_offender(tmp_path):
    bad = ast.parse("import pickle\ntorch.load(f)\nAuto.from_pretrained(x, trust_remote_code=True)\n")
    loads = [c for c in calls(bad) if dotted(c.func) == "torch.load"]
    assert len(loads) == 1 and not loads[0].keywords
    assert any(isinstance(n, ast.Import) and n.names[0].name == "pickle" for n in ast.walk(bad))
