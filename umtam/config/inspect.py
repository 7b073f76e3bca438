"""`umtam inspect`'s options."""

from __future__ import annotations

from pydantic import model_validator

from umtam.config.schema import PathText, Schema, option

DEFAULT_KEEP = 0.05


class InspectConfig(Schema):
    checkpoint: PathText = option(argument=True, help="The checkpoint to describe.")
    saliency: bool = option(False, flag="--saliency",
                            help="Add where the top-k curvature and magnitude saliency sits, by layer and module "
                                 "type (loads the weights and the base model).")
    keep: float | None = option(None, gt=0, le=1, default_text=f"{DEFAULT_KEEP}",
                                help="Top-k fraction for --saliency / --plot.")
    plot: PathText | None = option(None, metavar="FILE",
                              help="Draw the layer x module map of top-k saliency mass to this image (implies "
                                   "--saliency; needs umtam[plot]).")
    base: PathText | None = option(None, help="Where to find the base model, if not where the sidecar says "
                                         "(checked by sha256).")

    @model_validator(mode="after")
    def _saliency_options(self) -> "InspectConfig":
        if not self.wants_saliency and (self.keep is not None or self.base is not None):
            raise ValueError("--keep and --base apply to the saliency breakdown (add --saliency or --plot)")
        return self

    @property
    def wants_saliency(self) -> bool:
        return self.saliency or self.plot is not None

    @property
    def top_fraction(self) -> float:
        return DEFAULT_KEEP if self.keep is None else self.keep
