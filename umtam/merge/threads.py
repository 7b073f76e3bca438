"""The merge's threads: one torch thread per merging thread, and tensors merged side by side in order."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block loop on one intra-op thread, restoring the caller's setting after.

    A block's ops take well under a millisecond, too little for torch's intra-op
    threads to win back their synchronisation; on a machine whose cores are busy
    (a training job beside the merge) each op also waits for a descheduled
    thread, and 1 MiB ops measured 30 to 80 times slower on 2 threads than on 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def in_order(make: Callable[[str], Tensor], keys: Sequence[str], workers: int) -> Iterator[tuple[str, Tensor]]:
    """(key, make(key)) for each key in order, up to ``workers`` made at once.

    Results and errors come in key order, so the error raised is the one a
    single thread would have met first. Leaving the pool waits for the tensors
    being made: no thread reads an input after its file is closed.
    """
    if workers == 1:
        for key in keys:
            yield key, make(key)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="umtam-merge") as pool:
        pending: list[tuple[str, Future]] = []
        try:
            for key in keys:
                pending.append((key, pool.submit(make, key)))
                if len(pending) >= workers:
                    done_key, future = pending.pop(0)
                    yield done_key, future.result()
            for done_key, future in pending:
                yield done_key, future.result()
        finally:
            for _, future in pending:
                future.cancel()
