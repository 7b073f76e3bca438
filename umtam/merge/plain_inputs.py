"""Plain Hugging Face directories as merge inputs: what they cannot give, and the check that stands in.

A plain directory (hf_interop) records neither its base nor statistics. So a
method that reads statistics refuses it (unless it holds a Trainer's
optimizer.pt, whose Adam second moments umtam.adam_import turns into
statistics), ``--base`` is required, and instead
of the fingerprint the input is checked against that base: the same keys and
shapes (inputs.py and the base coverage check) and a small relative distance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from umtam.checkpoint import Checkpoint
from umtam.errors import ConfigError, MergeError
from umtam.merge.blocks import BLOCK_ENTRIES, row_blocks, row_slice
from umtam.merge.methods import METHODS
from umtam.saliency import check_finite
from umtam.scores import reads_statistics

if TYPE_CHECKING:
    from torch import Tensor

    from umtam.merge.base import MergeMethod
    from umtam.merge.inputs import Layout, Source
    from umtam.merge.pages import MappedPages

# A plain input farther than this from the base, relative to the base's norm, is refused
# (check_against_base says why 0.5 separates the cases).
MAX_PLAIN_DISTANCE = 0.5


def check_plain_inputs(spec: MergeMethod, options: Mapping[str, Any], checkpoints: Sequence[Checkpoint],
                       base: str | None) -> None:
    """What a plain Hugging Face input cannot give: statistics, and its base (so --base is required)."""
    plain = [checkpoint for checkpoint in checkpoints if checkpoint.is_plain]
    if not plain:
        return
    needed = scores_reading_stats(spec, options)
    without = [checkpoint for checkpoint in plain if checkpoint.imported_stats is None]
    if needed and without:
        raise MergeError(
            f"{without[0].path} is a plain Hugging Face directory without the training statistics that "
            f"merge method {spec.name} needs ({', '.join(needed)} saliency), and without an optimizer.pt to "
            "import them from",
            hint=f"use a weights-only method: {', '.join(weights_only_methods())}; or merge the Trainer's "
                 "checkpoint-N directories, whose optimizer.pt holds Adam's second moments",
        )
    if base is None:
        raise ConfigError(
            f"{plain[0].path} is a plain Hugging Face directory, which records no base model",
            hint="pass --base with the model it was fine-tuned from",
        )


def scores_reading_stats(spec: MergeMethod, options: Mapping[str, Any]) -> tuple[str, ...]:
    """The saliency scores the method uses that read training statistics (magnitude does not)."""
    return tuple(dict.fromkeys(score for score in spec.stats_needed(options) if reads_statistics(score)))


def weights_only_methods() -> tuple[str, ...]:
    """Methods that, with their default options, read no statistics."""
    return tuple(spec.name for spec in METHODS if not scores_reading_stats(spec, spec.resolve_options()))


def check_against_base(sources: Sequence[Source], layout: Layout, base: Mapping[str, Tensor] | None,
                       pages: MappedPages) -> dict[str, float]:
    """Refuse a plain input that does not look fine-tuned from the base; its distance per label.

    A plain directory records no base, so the fingerprint check cannot apply.
    Keys and shapes already match the base; a model of the same architecture
    fine-tuned from other pretrained weights would pass that, so the relative
    distance ||W - W0|| / ||W0|| over the 2-D weights (a fixed sample of
    their rows, relative_distances) must stay below
    MAX_PLAIN_DISTANCE: this project's MiniLM experts (3 epochs, AdamW at 5e-5
    to UMTAM at 5e-4) are 0.011 to 0.048 of the base's norm away from it, while
    unrelated weights of similar scale are about sqrt(2) apart.
    """
    plain = [source for source in sources if source.plain]
    if not plain:
        return {}
    distances = dict(zip((source.label for source in plain), relative_distances(plain, layout, base, pages)))
    for label, distance in distances.items():
        if not distance < MAX_PLAIN_DISTANCE:
            raise MergeError(
                f"{label} does not look fine-tuned from the base model: its 2-D weights are "
                f"{distance:.3g} of the base's norm away (at most {MAX_PLAIN_DISTANCE} is accepted)",
                hint="pass the model it was fine-tuned from with --base",
            )
    return distances


# The distance is taken over every DISTANCE_STRIDE-th row block of each tensor (its first block
# always, so a tensor of one block is read whole): a fixed 1/32 of a large model's weights (29M
# entries per input of a 0.9B model), far more than a ratio that separates 0.05 from 1.4 needs.
DISTANCE_STRIDE = 32


def relative_distances(sources: Sequence[Source], layout: Layout, base: Mapping[str, Tensor],
                       pages: MappedPages, stride: int = DISTANCE_STRIDE) -> list[float]:
    """||W - W0|| / ||W0|| of each source over the method tensors' sampled row blocks, in one pass.

    A sanity check, not a measurement: blocks 0, stride, 2 * stride, ... of
    every tensor, so it reads 1/stride of a large input where a full pass (the
    merge's own, which checks every row finite) reads it all. Every sampled
    block of W0 is read once for all sources; squared norms are dot products
    (no squared copy), on one torch thread like the merge's loop. A NaN or inf
    in an input makes its block's squared distance non-finite, and only then is the block
    searched for it, so that it is named for what it is rather than read as
    "not fine-tuned from this base".
    """
    import torch

    from umtam.merge.threads import one_torch_thread

    moved, total = [0.0] * len(sources), 0.0
    with one_torch_thread():
        for key in layout.method_keys():
            weights, start = [source.tensor(key) for source in sources], base[key]
            for block in row_blocks(layout.shapes[key], BLOCK_ENTRIES)[::stride]:
                rows = row_slice(block)
                start32 = start[rows].reshape(-1).to(torch.float32)
                total += float(torch.dot(start32, start32))
                for index, (source, weight) in enumerate(zip(sources, weights)):
                    moved_rows = weight[rows].reshape(-1).to(torch.float32) - start32
                    squared = float(torch.dot(moved_rows, moved_rows))
                    if not math.isfinite(squared):
                        check_finite(weight[rows], tensor_name=key, owner=source.label, block=block)
                    moved[index] += squared
            pages.release_files(*weights, start)
    if not total:
        return [0.0 if m == 0 else math.inf for m in moved]
    return [math.sqrt(m / total) for m in moved]
