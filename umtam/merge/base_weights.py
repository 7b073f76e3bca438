"""The base weights a merge reads: the record the inputs share, checked, or one made for plain inputs.

When every input is a plain Hugging Face directory the base is named by
``--base`` and only recorded: its fingerprint is hashed on a background thread
(base_model.identify_base, ``later``) while the merge reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from umtam.base_model import check_base_covers, identify_base, load_base_encoder
from umtam.merge.pages import MappedPages
from umtam.merge.planning import needs_base

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.base import MergeMethod
    from umtam.merge.inputs import Layout, Source


def load_base(spec: MergeMethod, options: Mapping[str, Any], sources: Sequence[Source], layout: Layout,
               override: str | None, pages: MappedPages) -> tuple[dict[str, Any], Mapping[str, Tensor] | None]:
    """The merged sidecar's base record, and the base encoder when the merge reads it.

    The record is the one the umtam inputs share (``override`` must then hash
    to it); when every input is a plain Hugging Face directory it is made from
    ``override`` (required for them), which is read to fingerprint it.
    """
    recorded = [source for source in sources if not source.plain]
    if not recorded:
        # hashed beside the distance check and the merge; its own page releaser: it runs on another thread
        record, base = identify_base(override, layout.keys, release=MappedPages().release, later=True)
    else:
        record = recorded[0].checkpoint.sidecar.base_model.as_json()
        if not needs_base(spec, options, sources):
            return record, None
        base = load_base_encoder(record, override=override, keys=layout.keys, release=pages.release)
    # the fingerprint read every page and handed each tensor's back; blocks fault back what they use
    pages.release(*base.values())
    check_base_covers(base, layout.shapes, (recorded or sources)[0].label, dtypes=layout.dtypes)
    return record, base
