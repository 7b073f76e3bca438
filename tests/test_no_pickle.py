"""No code execution from data: no pickle, torch.load only with weights_only=True, no remote code.

Each check is a function from source text to offending lines, run over every
module of umtam/ and umtam_cli/ and, in test_each_check_flags_what_it_must,
over small snippets that must (and must not) be flagged, so a check that has
gone blind fails too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGES = [Path(__file__).resolve().parents[1] / name for name in ("umtam", "umtam_cli")]
PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve")
# Loaders that unpickle: torch.load unless weights_only=True; these always or on request.
TORCH_LOADS = ("torch.load", "torch.serialization.load")
PICKLE_CALLS = ("pandas.read_pickle", "numpy.load", "joblib.load")


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


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it names: ``import torch as t`` t -> torch; ``from torch import load`` load -> torch.load."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]  # ``import a.b`` binds a; ``import a.b as c`` binds c to a.b
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def resolved_name(call: ast.Call, aliases: dict[str, str]) -> str:
    """The called function's full dotted name, aliases undone (np.load -> numpy.load)."""
    name = dotted(call.func)
    head, _, rest = name.partition(".")
    full = aliases.get(head, head)
    return f"{full}.{rest}" if rest else full


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is value
               for kw in call.keywords)


def pickle_imports(source: str) -> list[int]:
    """Lines importing a pickle-family module, statically or through importlib / __import__."""
    offenders = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and dotted(node.func).split(".")[-1] in ("import_module", "__import__"):
            names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        offenders += [node.lineno for name in names if name.split(".")[0] in PICKLE_MODULES]
    return offenders


def unsafe_loads(source: str) -> list[int]:
    """Lines calling torch.load without weights_only=True, or a loader that unpickles."""
    tree = ast.parse(source)
    aliases = import_aliases(tree)
    offenders = []
    for call in calls(tree):
        name = resolved_name(call, aliases)
        if name in TORCH_LOADS and not keyword_is(call, "weights_only", True):
            offenders.append(call.lineno)
        elif name == "numpy.load" and not keyword_is(call, "allow_pickle", False):
            offenders.append(call.lineno)  # numpy's default changed over versions: say it
        elif name in PICKLE_CALLS and name != "numpy.load":
            offenders.append(call.lineno)
    return offenders


def trusted_remote_code(source: str) -> list[int]:
    """Calls passing trust_remote_code as anything but a literal False (a variable could be True)."""
    return [call.lineno for call in calls(ast.parse(source)) for kw in call.keywords
            if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False)]


# trust_remote_code=True, "trust_remote_code": True, trust_remote_code = True: any spelling, in any text.
REMOTE_CODE_TRUE = re.compile(r"""trust_remote_code['"]?\s*[:=]\s*True\b""")


def grep_remote_code_true(source: str) -> list[int]:
    return [number for number, line in enumerate(source.splitlines(), 1) if REMOTE_CODE_TRUE.search(line)]


CHECKS = [pickle_imports, unsafe_loads, trusted_remote_code, grep_remote_code_true]


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_package_passes(check):
    offenders = [f"{path.relative_to(path.parents[1])}:{line}" for path in python_files()
                 for line in check(path.read_text())]
    assert offenders == []


def test_the_checks_read_every_module():
    names = {path.name for path in python_files()}
    assert {"checkpoint.py", "models.py", "main.py", "engine.py"} <= names and len(names) > 20


@pytest.mark.parametrize("check, source, flagged", [
    (pickle_imports, "import pickle\n", [1]),
    (pickle_imports, "import os\nfrom pickle import loads\n", [2]),
    (pickle_imports, "import cloudpickle as cp\n", [1]),
    (pickle_imports, "import importlib\nm = importlib.import_module('dill')\n", [2]),
    (pickle_imports, "m = __import__('pickle')\n", [1]),
    (pickle_imports, "import json\nfrom safetensors.torch import load_file\n", []),
    (unsafe_loads, "import torch\ntorch.load(f)\n", [2]),
    (unsafe_loads, "import torch\ntorch.load(f, weights_only=False)\n", [2]),
    (unsafe_loads, "import torch as t\nt.load(f, map_location='cpu')\n", [2]),
    (unsafe_loads, "from torch import load\nload(f)\n", [2]),
    (unsafe_loads, "from torch.serialization import load as tl\ntl(f)\n", [2]),
    (unsafe_loads, "import numpy as np\nnp.load(f, allow_pickle=True)\n", [2]),
    (unsafe_loads, "import pandas as pd\npd.read_pickle(f)\n", [2]),
    (unsafe_loads, "import torch\ntorch.load(f, weights_only=True)\n", []),
    (unsafe_loads, "import numpy as np\nnp.load(f, allow_pickle=False)\n", []),
    (unsafe_loads, "import json\njson.load(f)\n", []),
    (trusted_remote_code, "AutoModel.from_pretrained(x, trust_remote_code=True)\n", [1]),
    (trusted_remote_code, "AutoModel.from_pretrained(x, trust_remote_code=flag)\n", [1]),
    (trusted_remote_code, "AutoModel.from_pretrained(x, trust_remote_code=False)\n", []),
    (grep_remote_code_true, "kwargs = {'trust_remote_code': True}\n", [1]),
    (grep_remote_code_true, "config.trust_remote_code = True\n", [1]),
    (grep_remote_code_true, "f(x, trust_remote_code=True)\n", [1]),
    (grep_remote_code_true, "f(x, trust_remote_code=False)  # never True\n", []),
])
def test_each_check_flags_what_it_must(check, source, flagged):
    assert check(source) == flagged
