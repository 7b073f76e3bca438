"""Training precision: ``--dtype fp32|bf16|fp16``, always with fp32 master weights and fp32 optimizer math.

The weights, their gradients and every optimizer and curvature statistic stay
float32; ``bf16`` and ``fp16`` run the forward and backward passes under
``torch.autocast`` (matrix products and attention in the low precision, the
numerically sensitive ops such as softmax, norms and the loss in float32, as
torch's autocast lists decide). What each device supports:

    fp32   everywhere
    bf16   CUDA devices that support it (Ampere and newer); CPUs with native
           bfloat16 (AVX512-BF16 or AMX, as torch's oneDNN reports). bf16 has
           float32's exponent range, so no loss scaling is needed.
    fp16   CUDA only: its narrow range needs dynamic loss scaling (GradScaler),
           which skips a step whose gradients overflowed and lowers the scale.

A dtype the device cannot run is refused before any work, in one line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from umtam.errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")


def torch_dtype(name: str | None):
    """The torch dtype of a DTYPES name (None stays None: "as stored")."""
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


@dataclass
class Precision:
    """How one run computes: ``name`` (DTYPES) on ``device_type``; ``scaler`` for fp16's loss scaling."""

    name: str
    device_type: str
    scaler: Any = None  # torch.amp.GradScaler for fp16, else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward (and with it the backward) pass in this precision; fp32 is a no-op."""
        import torch

        if self.name == "fp32":
            yield
            return
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        with torch.autocast(device_type=self.device_type, dtype=dtype):
            yield


def precision_for(name: str, device, *, scaler_device: str | None = None) -> Precision:
    """The Precision for ``--dtype name`` on ``device``, or a ConfigError saying what the device supports.

    ``scaler_device`` builds fp16's GradScaler on another device type than
    ``device``'s; tests use it to exercise loss scaling on a CPU.
    """
    import torch

    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    kind = device.type
    if name == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support bfloat16",
                          hint="use --dtype fp16 (with loss scaling) or fp32")
    if name == "bf16" and kind == "cpu" and not cpu_supports_bf16():
        raise ConfigError("--dtype bf16: this CPU has no native bfloat16 (torch's oneDNN reports neither "
                          "AVX512-BF16 nor AMX)", hint="use --dtype fp32 on this CPU, or train on a GPU")
    if name == "fp16" and kind != "cuda" and scaler_device is None:
        raise ConfigError("--dtype fp16 needs a CUDA device (its loss scaling is a GPU feature in umtam)",
                          hint="on a CPU use --dtype bf16 (where the CPU supports it) or fp32")
    scaler = torch.amp.GradScaler(scaler_device or kind) if name == "fp16" else None
    return Precision(name, kind, scaler)
