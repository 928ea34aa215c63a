"""PNG plots of evaluation sweeps: effect and perplexity against strength, and how chat
replies read (matplotlib extra)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import files
from .errors import BadInput
from .evaluate import MAX_PPL_RATIO, Sweep, recommend

if TYPE_CHECKING:
    from .chateval import ChatPoint

EXTRA_HINT = "pip install matplotlib (the `plot` extra)"  # edge-steer is not on PyPI yet


def require(path: str | Path) -> None:
    """Fail early, before minutes of measuring, when the optional extra is missing or
    `path` is not a PNG file that can be written."""
    if Path(path).suffix.lower() != ".png":
        raise BadInput(f"--plot {path}: name a .png file")
    files.check_writable(Path(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput(f"--plot needs matplotlib, which is not installed: {EXTRA_HINT}") from None


def write(
    path: str | Path,
    sweeps: Mapping[str, Sweep],
    title: str,
    chat: Sequence[ChatPoint] | None = None,
) -> Path:
    """Effect (top) and perplexity ratio (middle) against strength, one line per sweep;
    with `chat` (`eval --chat`), how the chat replies read (bottom).

    With a single sweep, its recommended range is shaded and the persona-prompt baseline is
    drawn as stars at +1 / -1. Written to a temp file, then renamed into place.
    """
    require(path)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 9.5 if chat else 6.5), layout="constrained")
    effect_ax, ppl_ax, *chat_ax = fig.subplots(3 if chat else 2, 1, sharex=True)
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
    if chat:
        _chat_panel(chat_ax[0], chat)
    (chat_ax or [ppl_ax])[0].set_xlabel("strength")
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


def _chat_panel(ax, chat: Sequence[ChatPoint]) -> None:
    """The persona score of chat replies (does a steered reply read like the persona-prompted
    model's own?) and, on the right axis, the share of replies that loop."""
    x = [p.strength for p in chat]
    ax.plot(x, [p.persona for p in chat], "o-", color="tab:blue", label="persona score")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("chat replies: persona score\n(nats per token, + vs - persona)")
    loops = ax.twinx()
    loops.plot(x, [p.degenerate for p in chat], "s--", color="tab:red", label="looping replies")
    loops.set_ylim(0, 1.05)
    loops.set_ylabel("share of looping replies")
    lines = ax.get_legend_handles_labels(), loops.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize="small")


def _save(fig, path: Path) -> Path:
    try:
        return files.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    except OSError as exc:
        raise BadInput(f"cannot write the plot {path} ({exc.strerror or exc})") from None
