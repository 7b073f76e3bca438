"""Where a merge's tensors go: a dict in memory, or a WeightsWriter that streams them to disk.

``output_entries`` declares every output tensor (name, stored dtype, shape)
before the first one is merged, which is what lets umtam.shards lay the file
out up front and take each merged tensor as soon as it exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from umtam.safetensors_io import FLOAT_DTYPES

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.inputs import Layout, Source


class Sink:
    """Where merged tensors go: a callable (a dict's __setitem__), or a WeightsWriter opened on the entries."""

    def __init__(self, put=None, *, open_writer=None):
        self._put, self._open_writer, self._writer = put, open_writer, None

    def open(self, entries) -> None:
        if self._open_writer is not None:
            self._writer = self._open_writer(entries)
            self._put = self._writer.write

    def put(self, name: str, tensor: Tensor) -> None:
        self._put(name, tensor)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    @property
    def digests(self) -> dict[str, str]:
        """The sha256 of each file the writer wrote, taken as it wrote them (empty for a dict)."""
        return dict(self._writer.digests) if self._writer is not None else {}

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def output_entries(sources: Sequence[Source], layout: Layout, target) -> list:
    """Every output tensor's name, dtype and shape, in the order nothing depends on (umtam.shards lays them out)."""
    from umtam.shards import Entry, safetensors_dtype

    def dtype_of(stored: str) -> str:
        return safetensors_dtype(target) if target is not None and stored in FLOAT_DTYPES else stored

    entries = [Entry(key, dtype_of(layout.dtypes[key]), tuple(layout.shapes[key])) for key in layout.keys]
    for source in sources:
        entries += [Entry(out_key, dtype_of(source.dtype(in_key)), tuple(source.shape(in_key)))
                    for out_key, in_key in source.heads.items()]
    return entries
