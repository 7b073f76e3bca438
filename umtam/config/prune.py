"""`umtam prune`'s options: what to keep (recorded in the pruned checkpoint's lineage) and where."""

from __future__ import annotations

from typing import Annotated, Literal

from umtam.config.output import WeightsOutput
from umtam.config.schema import PathText, Schema, option, registered
from umtam.scores import DEFAULT_SCORE, SCORES


class PruneSettings(Schema):
    """How to prune: the sidecar's lineage records exactly these."""

    keep: float = option(gt=0, le=1, help="Fraction of task-vector entries to keep.")
    score: Annotated[str, registered(SCORES)] = option(
        DEFAULT_SCORE, help="Saliency score that ranks the entries (the list below).")
    scope: Literal["global", "tensor"] = option("global", help="One threshold over all 2-D weights, or one "
                                                               "per tensor.")


class PruneConfig(PruneSettings, WeightsOutput):
    checkpoint: PathText = option(argument=True, recorded=False, help="The checkpoint to prune.")
    base: PathText | None = option(None, recorded=False,
                              help="Where to find the base model, if not where the sidecar says (checked by sha256).")
    output: PathText = option(short="-o", recorded=False, help="Checkpoint directory to create.")
    force: bool = option(False, flag="--force", recorded=False, help="Replace an existing output directory.")
