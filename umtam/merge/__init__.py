"""Merging checkpoints fine-tuned from one base: the engine and the registered methods.

    from umtam.merge import merge_checkpoints, plan, available_methods
    merge_checkpoints(["mrpc/", "sst2/"], "merged/", method="umtam", options={"keep": 0.2})

engine.py owns all file I/O and streams tensors; every method is a pure
function over one tensor group, in its own module, registered in methods.py.
The engine's names load on first use (PEP 562), so reading the methods and
their options does not import torch.
"""

from __future__ import annotations

import importlib

from umtam.merge.base import MergeMethod, MethodOptions
from umtam.merge.methods import DEFAULT_METHOD, METHODS, available_methods, get_method, register

_LAZY = {
    "MergePlan": "umtam.merge.planning", "MergeReport": "umtam.merge.engine", "TensorGroup": "umtam.merge.group",
    "merge_checkpoints": "umtam.merge.engine", "merge_tensors": "umtam.merge.engine", "plan": "umtam.merge.engine",
}

__all__ = ["DEFAULT_METHOD", "METHODS", "MergeMethod", "MethodOptions", "available_methods", "get_method",
           "register", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'umtam.merge' has no attribute {name!r}")
