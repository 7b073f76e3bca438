"""`umtam inspect`'s options."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator

from umtam.config.schema import PathText, Schema, option, registered
from umtam.scores import INSPECT_SCORES, SCORES

DEFAULT_KEEP = 0.05


def _score_names(value: Any) -> Any:
    """"curvature,magnitude" (the command line) or a recipe's list, as a list of names."""
    return [item.strip() for item in value.split(",")] if isinstance(value, str) else value


class InspectConfig(Schema):
    checkpoint: PathText = option(argument=True, help="The checkpoint to describe.")
    saliency: bool = option(False, flag="--saliency",
                            help="Add where the top-k saliency sits, by layer and module type, for each of "
                                 "--scores (loads the weights and the base model).")
    scores: Annotated[list[Annotated[str, registered(SCORES)]] | None, BeforeValidator(_score_names)] = option(
        None, metavar="SCORE[,SCORE...]", default_text=",".join(INSPECT_SCORES),
        help="Saliency scores to map, left to right: any of prune's --score (the first default is prune's).")
    keep: float | None = option(None, gt=0, le=1, default_text=f"{DEFAULT_KEEP}",
                                help="Top-k fraction for --saliency / --plot.")
    plot: PathText | None = option(None, metavar="FILE",
                              help="Draw the layer x module map of top-k saliency mass to this image (implies "
                                   "--saliency; needs umtam[plot]).")
    base: PathText | None = option(None, help="Where to find the base model, if not where the sidecar says "
                                         "(checked by sha256).")

    @model_validator(mode="after")
    def _saliency_options(self) -> "InspectConfig":
        given = self.keep is not None or self.base is not None or self.scores is not None
        if not self.wants_saliency and given:
            raise ValueError("--keep, --scores and --base apply to the saliency breakdown (add --saliency or --plot)")
        return self

    @property
    def wants_saliency(self) -> bool:
        return self.saliency or self.plot is not None

    @property
    def saliency_scores(self) -> tuple[str, ...]:
        return INSPECT_SCORES if self.scores is None else tuple(self.scores)

    @property
    def top_fraction(self) -> float:
        return DEFAULT_KEEP if self.keep is None else self.keep
