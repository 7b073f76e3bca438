"""Options of commands that write weights (prune, merge): the stored dtype and shard size, declared once."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator

from umtam.config.schema import Schema, option


def _size(text: str | None) -> str | None:
    from umtam.errors import ConfigError
    from umtam.shards import parse_size

    if text is not None:
        try:
            parse_size(text)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
    return text


class WeightsOutput(Schema):
    """How the output's weights are stored; the values are computed in float32 either way."""

    out_dtype: Literal["fp32", "bf16", "fp16"] | None = option(
        None, recorded=False, metavar="DTYPE", default_text="each tensor's input dtype",
        help="Store floating tensors as fp32, bf16 or fp16 (computed in float32 either way).")
    out_shard_size: Annotated[str | None, AfterValidator(_size)] = option(
        None, recorded=False, metavar="SIZE", default_text="one model.safetensors",
        help="Write the weights in shards of at most SIZE (5GB, 500MB, 2GiB) with model.safetensors.index.json.")

    @property
    def shard_bytes(self) -> int | None:
        from umtam.shards import parse_size

        return None if self.out_shard_size is None else parse_size(self.out_shard_size)
