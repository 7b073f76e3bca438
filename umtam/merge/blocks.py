"""Row blocks: how the engine cuts a large tensor so that K inputs' temporaries stay small.

Results do not depend on the block size (methods are elementwise once a
tensor's per-tensor quantities are fixed, umtam.merge.group), only memory does.
"""

from __future__ import annotations

import math
from typing import Sequence

from umtam.saliency import RowBlock

# Entries per input in one row block: 1 MiB of float32 per input, so a block's
# (K, rows, n) temporaries stay in cache and the working set is a few MiB.
BLOCK_ENTRIES = 1 << 18

# Tensors merged at once, each by its own thread on one torch thread: a second core does half
# the work where a tensor's ops are too small to split (threads.one_torch_thread). A global trim
# spends one tie allowance across the tensors in name order, so it merges one at a time.
MERGE_WORKERS = 2


def row_blocks(shape: Sequence[int], block_entries: int) -> list[RowBlock | None]:
    """The row blocks a tensor is merged in: [None] (the whole tensor) when it fits in one."""
    rows = shape[0] if shape else 1
    step = max(1, block_entries // max(1, math.prod(shape[1:])))
    if step >= rows:
        return [None]
    return [RowBlock(start, min(start + step, rows), rows) for start in range(0, rows, step)]


def block_numel(shape: Sequence[int], block_entries: int) -> int:
    first = row_blocks(shape, block_entries)[0]
    return math.prod(shape) if first is None else (first.stop - first.start) * math.prod(shape[1:])


def row_slice(block: RowBlock | None) -> slice:
    return slice(None) if block is None else slice(block.start, block.stop)
