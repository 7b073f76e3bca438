"""Merging checkpoints fine-tuned from one base: the engine and the registered methods.

    from umtam.merge import merge_checkpoints, plan, available_methods
    merge_checkpoints(["mrpc/", "sst2/"], "merged/", method="umtam", options={"keep": 0.2})

engine.py owns all file I/O and streams tensors; every method is a pure
function over one tensor group, in its own module, registered in methods.py.
"""

from umtam.merge.base import MergeMethod, Option, TensorGroup
from umtam.merge.engine import (MergePlan, MergeReport, companion_files, merge_checkpoints, merge_tensors,
                                merged_companion_files, plan)
from umtam.merge.methods import DEFAULT_METHOD, available_methods, get_method, register

__all__ = [
    "DEFAULT_METHOD", "MergeMethod", "MergePlan", "MergeReport", "Option", "TensorGroup",
    "available_methods", "companion_files", "get_method", "merge_checkpoints", "merge_tensors",
    "merged_companion_files", "plan", "register",
]
