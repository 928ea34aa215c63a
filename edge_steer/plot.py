"""PNG plots of evaluation sweeps: effect and perplexity against strength (matplotlib extra)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from . import files
from .errors import BadInput
from .evaluate import MAX_PPL_RATIO, Sweep, recommend

EXTRA_HINT = "pip install matplotlib (the `plot` extra)"  # edge-steer is not on PyPI yet


def require() -> None:
    """Fail early, before minutes of measuring, when the optional extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from None


def write(path: str | Path, sweeps: Mapping[str, Sweep], title: str) -> Path:
    """Effect (top) and perplexity ratio (bottom) against strength, one line per sweep.

    With a single sweep, its recommended range is shaded and the persona-prompt baseline is
    drawn as stars at +1 / -1. Written to a temp file, then renamed into place.
    """
    require()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6.5), layout="constrained")
    effect_ax, ppl_ax = fig.subplots(2, 1, sharex=True)
    for label, result in sweeps.items():
        x = [p.strength for p in result.points]
        line = effect_ax.plot(x, [result.effect(p) for p in result.points], "o-", label=label)
        ppl_ax.plot(
            x, [result.ppl_ratio(p) for p in result.points], "o-", color=line[0].get_color()
        )
        if len(sweeps) == 1:
            _decorate_single(effect_ax, ppl_ax, result)
    effect_ax.axhline(0, color="grey", linewidth=0.8)
    ppl_ax.axhline(
        MAX_PPL_RATIO, color="tab:red", linestyle="--", linewidth=1, label=f"x{MAX_PPL_RATIO} limit"
    )
    ppl_ax.axhline(1, color="grey", linewidth=0.8)
    effect_ax.set_ylabel("effect on probes (nats)")
    ppl_ax.set_ylabel("perplexity ratio")
    ppl_ax.set_xlabel("strength")
    effect_ax.set_title(title)
    effect_ax.legend(fontsize="small", ncols=2 if len(sweeps) > 4 else 1)
    ppl_ax.legend(fontsize="small", loc="upper left")
    return _save(fig, Path(path))


def _decorate_single(effect_ax, ppl_ax, result: Sweep) -> None:
    span = recommend(result)
    if span is not None:
        effect_ax.axvspan(*span, color="tab:green", alpha=0.12, label="recommended range")
        ppl_ax.axvspan(*span, color="tab:green", alpha=0.12)
    if result.baseline:
        x = [p.strength for p in result.baseline]
        star = {"marker": "*", "linestyle": "", "markersize": 12, "color": "tab:purple"}
        effect_ax.plot(
            x, [result.effect(p) for p in result.baseline], label="persona prompt", **star
        )
        ppl_ax.plot(x, [result.ppl_ratio(p) for p in result.baseline], **star)


def _save(fig, path: Path) -> Path:
    try:
        return files.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    except OSError as exc:
        raise BadInput(f"cannot write the plot {path} ({exc.strerror or exc})") from None
