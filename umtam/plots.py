"""Small matplotlib figures shared by the CLI and the benchmarks (matplotlib is the optional `plot` extra).

Figures are drawn through matplotlib's object API on the Agg canvas, not pyplot:
no global backend switch, no GUI, safe in a headless process and inside a
caller that uses another backend.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

from umtam.errors import ConfigError

SMOOTHING_WINDOW = 20  # steps in the loss curves' moving average: batch noise hides trends otherwise


def agg_canvas():
    """The Agg canvas class, or a ConfigError saying how to get matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ConfigError("plotting needs matplotlib", hint="install umtam[plot]") from None
    return FigureCanvasAgg


def moving_average(values: Sequence[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start, where fewer exist)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_curves_png(curves: Mapping[str, Sequence[float]], *, title: str,
                    styles: Mapping[str, Mapping] | None = None) -> bytes:
    """PNG bytes of per-step training losses (raw, faint) and their moving average, one line per label."""
    from matplotlib.figure import Figure

    canvas_class = agg_canvas()
    figure = Figure(figsize=(7, 4), layout="constrained")
    canvas_class(figure)
    axis = figure.subplots()
    for label, curve in curves.items():
        style = dict((styles or {}).get(label, {}))
        steps = range(1, len(curve) + 1)
        (line,) = axis.plot(steps, moving_average(curve), label=label, **style)
        if len(curves) == 1:  # one run: show the raw steps behind its average
            axis.plot(steps, curve, color=line.get_color(), alpha=0.25, linewidth=0.8)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"training loss ({SMOOTHING_WINDOW}-step moving average)")
    axis.set_title(title)
    axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
