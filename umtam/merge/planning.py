"""What a merge would do and cost, from the inputs' headers alone (``umtam merge --dry-run``).

Memory model (what the merge adds to the interpreter and torch, on Linux):

    merged output        MERGE_WORKERS tensors being made, plus the writing
                         thread's (one being written, QUEUED waiting): every
                         merged tensor goes to its place in the output file as
                         soon as it is made (umtam.shards); ``merge_tensors``,
                         the in-memory API, holds them all
    working set          per merge thread, one block's float32 temporaries of
                         K x block_entries (task vectors, curvature, scores,
                         signs, weights and their products) plus the allocator's
                         slack: 40 to 70 MiB for K = 4 at the default block size
    mapped input pages   each block's pages are handed back once it is merged,
                         and every page of the files once a tensor is done
                         (pages.py: madvise on the file mapping; the page cache
                         keeps them), so about K blocks are resident, not K models
    base encoder W0      only when the method or ``norms="base"`` needs it: read
                         straight from the base model's safetensors when it is a
                         local directory, memory-mapped and fingerprinted tensor
                         by tensor, each one's pages handed back once hashed
                         (``base_model.fingerprint``), then read block by block
                         like the inputs. A base rebuilt through transformers
                         (the fallback) is held whole: about two models more.

So the peak is about five of the largest tensor (two being made, three with
the writer) plus the working set: 0.3 to 0.4 of one model for three 0.9B Llama experts
(bench/llm_merge.py). Where pages cannot be handed back (not Linux), the mapped
inputs and base stay resident as they are read: page cache, counted in RSS,
reclaimable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from umtam.merge.blocks import BLOCK_ENTRIES, MERGE_WORKERS, block_numel
from umtam.merge.pages import MappedPages
from umtam.safetensors_io import TORCH_DTYPES
from umtam.shards import QUEUED

if TYPE_CHECKING:
    from umtam.merge.base import MergeMethod
    from umtam.merge.inputs import Layout, Source

# Float32 buffers of one block's size in the peak working set, per input (task
# vectors, curvature, scores, signs, weights, products, the mapped rows and the
# allocator's slack) and shared (sums, W0 rows, result rows): fitted to the
# peaks bench/merge.py measures for umtam and ties, the most demanding methods.
_WORK_COPIES_PER_INPUT = 14
_WORK_COPIES_SHARED = 8
_HISTOGRAM_BYTES = ((1 << 15) + (1 << 16)) * 8  # per input, streaming thresholds


@dataclass(frozen=True)
class MergePlan:
    """What a merge would do (``--dry-run``), from the inputs' headers alone."""

    inputs: tuple[str, ...]
    tasks: tuple[str, ...]
    method: str
    options: dict[str, Any]
    tensor_count: int  # encoder tensors: method weights + 1-D parameters + others
    method_tensors: int  # of which the method merges (2-D and higher floating)
    head_tensors: int
    passes: int  # streaming passes over all inputs: 1, or 3 with a global trim (a per-tensor
    # trim of a tensor split into row blocks adds two over that tensor alone)
    needs_base: bool
    estimated_peak_bytes: int  # what the merge adds to the interpreter (module docstring)

    def as_dict(self) -> dict[str, Any]:
        return {
            "inputs": list(self.inputs), "tasks": list(self.tasks), "method": self.method,
            "options": dict(self.options), "tensor_count": self.tensor_count,
            "method_tensors": self.method_tensors, "head_tensors": self.head_tensors,
            "passes": self.passes, "needs_base": self.needs_base,
            "estimated_peak_bytes": self.estimated_peak_bytes,
        }

    @property
    def progress_steps(self) -> int:
        """Tensors the progress bar counts: the prepare passes (global trim), then every encoder tensor."""
        return (2 * self.method_tensors if self.passes == 3 else 0) + self.tensor_count


def needs_base(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[Source]) -> bool:
    # a plain input is checked against the base, whatever the method
    return spec.needs_base or options["norms"] == "base" or any(source.plain for source in sources)


def make_plan(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[Source],
              layout: Layout, block_entries: int = BLOCK_ENTRIES) -> MergePlan:
    """The plan, with the peak memory of the memory model above.

    The estimate is what the merge adds to the interpreter: the tensors the
    streaming output holds at once, one row block's working set and the
    threshold histograms. Where mapped pages cannot be handed back, the inputs'
    and base's files count whole.
    """
    method_keys = layout.method_keys()
    count = len(sources)
    numel = {key: math.prod(layout.shapes[key]) for key in layout.keys}
    block = max((block_numel(layout.shapes[key], block_entries) for key in method_keys), default=0)
    work = MERGE_WORKERS * (_WORK_COPIES_PER_INPUT * count + _WORK_COPIES_SHARED) * block * 4
    work += count * _HISTOGRAM_BYTES
    base_needed = needs_base(spec, options, sources)
    encoder_bytes = sum(numel[key] * _dtype_size(layout.dtypes[key]) for key in layout.keys)
    base_bytes = encoder_bytes if base_needed else 0
    head_count = sum(len(source.heads) for source in sources)
    largest = max((numel[key] * _dtype_size(layout.dtypes[key]) for key in layout.keys), default=0)
    held = (MERGE_WORKERS + QUEUED + 1) * largest  # being made, waiting for the writer, being written
    if not MappedPages().can_release:
        held += base_bytes + sum(source.checkpoint.weights_bytes() for source in sources)
    return MergePlan(
        inputs=tuple(source.label for source in sources),
        tasks=tuple(task for source in sources for task in source.checkpoint.tasks),
        method=spec.name,
        options=dict(options),
        tensor_count=len(layout.keys),
        method_tensors=len(method_keys),
        head_tensors=head_count,
        passes=3 if spec.uses_global_trim(options) else 1,
        needs_base=base_needed,
        estimated_peak_bytes=held + work,
    )


def _dtype_size(dtype: str) -> int:
    return TORCH_DTYPES.get(dtype, 4)
