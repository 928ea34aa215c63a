"""`edge-steer eval`: does a vector work, and at what strength? Table, chart, plot, JSON."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

import typer

from ..constants import RANDOM_SEED
from ..errors import BadInput
from .options import (
    LOAD,
    JsonOpt,
    LayersOpt,
    RetrainOpt,
    check_files_named,
    clean_errors,
    err,
    load_model,
    out,
    print_json,
    progress_bar,
    with_options,
)

if TYPE_CHECKING:
    from rich.table import Table

    from ..chateval import ChatPoint
    from ..evaluate import Sweep
    from ..evaluation import EvalReport


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


@clean_errors
@with_options(LOAD)
def eval_command(
    vector: Annotated[str, typer.Argument(help="Vector NAME or PATH (no strength).")],
    strengths: Annotated[
        str | None,
        typer.Option(
            "--strengths",
            help="A..B[:STEP] or a comma list; 0 is added. Default -2..2:1, and ±0.5 where "
            "±1 is already over the perplexity limit.",
        ),
    ] = None,
    layers: LayersOpt = None,
    probes: Annotated[
        str | None,
        typer.Option("--probes", help="JSONL of {prompt, positive, negative} (custom concepts)."),
    ] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also measure the persona as a prompt instead.")
    ] = False,
    personas: Annotated[
        str | None,
        typer.Option(
            "--personas", help="POSITIVE,NEGATIVE persona words for --baseline and --chat."
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", help="Sampled generations per strength (degeneration).")
    ] = 8,
    sample_tokens: Annotated[int, typer.Option("--sample-tokens", help="Tokens per sample.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first sample.")] = 0,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write a PNG plot here (needs the plot extra).")
    ] = None,
    save: Annotated[
        bool, typer.Option("--save/--no-save", help="Store the recommended range in the vector.")
    ] = True,
    retrain: RetrainOpt = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Also steer chat replies to everyday questions and score how they read "
            "(instruct models).",
        ),
    ] = False,
    chat_replies: Annotated[
        int | None,
        typer.Option(
            "--chat-replies", help="With --chat: replies per question and strength (default 3)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    *,
    opts,
) -> None:
    """Measure a vector's effect and fluency cost over strengths; recommend a range."""
    from .. import dataset, evaluate, evaluation

    if not 0 <= seed < RANDOM_SEED:  # eval's samples repeat run after run: no "random"
        raise BadInput(f"--seed {seed} is out of range: use 0 to {RANDOM_SEED - 1}")
    check_files_named(probes=probes, plot=plot)
    options = evaluation.EvalOptions(
        strengths=evaluate.parse_strengths(strengths) if strengths else None,
        layers=layers,
        probes=dataset.load_probes_jsonl(probes) if probes else None,
        baseline=baseline,
        personas=personas,
        samples=samples,
        sample_tokens=sample_tokens,
        seed=seed,
        save=save,
        retrain=retrain,
        chat=chat,
        chat_replies=chat_replies,
        threads=opts.threads,
    )
    if plot:
        from .. import plot as plotting

        plotting.require(plot)
    evaluation.vector_name(vector)  # a bad spec fails before the model loads
    loaded = load_model(opts, evaluate.EVAL_CTX)
    with progress_bar() as on_progress:
        report = evaluation.evaluate_vector(loaded, vector, options, on_progress=on_progress)
    if plot:
        span = "-".join(map(str, report.layers)) if report.layers else "all"
        title = f"{report.concept} on {loaded.name} (blocks {span})"
        plotting.write(plot, {report.concept: report.sweep}, title, chat=report.chat)
        report = replace(report, plot=plot)
    if as_json:
        print_json(report.to_json())
    else:
        _render(report)


# -- rendering ---------------------------------------------------------------------------------


def _render(report: EvalReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    from ..evaluate import share

    out.print(
        f"[bold]{escape(report.concept)}[/] on {escape(report.model_name)} · "
        f"{report.probes} probes · "
        f"blocks {'-'.join(map(str, report.layers)) if report.layers else 'all'}"
    )
    table = Table(title="effect on held-out probes and cost on neutral text")
    columns = ("strength", "effect (nats)", "perplexity", "ratio", "effect/cost", "degenerate")
    for column in (*columns, "range"):
        table.add_column(column, justify="right")
    for p in report.points:
        over = p.ppl_ratio > report.max_ppl_ratio
        table.add_row(
            f"{p.strength:+g}",
            f"{p.effect:+.2f}",
            f"{p.perplexity:.2f}",
            f"x{p.ppl_ratio:.3f}",
            "" if p.effect_per_cost is None else f"{p.effect_per_cost:+.1f}",
            share(p.degenerate),
            "✓" if p.in_range else "",
            style="green" if p.in_range else ("red" if over else ""),
        )
    out.print(table)
    if report.calibration["scale"] is not None:
        out.print(f"[dim]{calibration_line(report.calibration)}[/]")
    out.print(chart(report.sweep, report.max_ppl_ratio))
    if report.baseline:
        out.print(_baseline_table(report))
    if report.chat:
        out.print(_chat_table(report.chat, out.width))
    _verdict(report)
    for line in chat_loop_warnings(report.chat or [], report.recommended):
        out.print(f"[yellow]{line}[/]")


def calibration_line(calibration: dict) -> str:
    """What +/-1 was calibrated to: a perplexity budget, and on chat models an entropy one."""
    limit = f"x{calibration['budget']} perplexity"
    if calibration.get("entropy_budget") is not None:
        limit += f" or +{calibration['entropy_budget']} nats of entropy, whichever came first,"
    return (
        f"calibrated: ±1 = {limit} on held-in text (scale {calibration['scale']:g}); "
        "effect/cost = nats per nat of perplexity"
    )


def _baseline_table(report: EvalReport) -> Table:
    from rich.table import Table

    from ..evaluate import share

    table = Table(title="the persona as a prompt instead of a vector (unsteered)")
    for column in ("prompt", "effect (nats)", "ratio", "degenerate", "vector at same sign"):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    by_strength = {p.strength: p for p in report.points}
    for b in report.baseline:
        same = by_strength.get(b.strength)
        vector = f"{same.effect:+.2f}, x{same.ppl_ratio:.3f}" if same else "-"
        table.add_row(
            f"extremely {b.persona} ({b.strength:+g})",
            f"{b.effect:+.2f}",
            f"x{b.ppl_ratio:.3f}",
            share(b.degenerate),
            vector,
        )
    return table


def _chat_table(points: list[ChatPoint], width: int) -> Table:
    """The figures keep their width; the first reply gets what is left of `width` (none in
    a narrow terminal)."""
    from rich.table import Table

    table = Table(
        title=f"{points[0].replies} chat replies to everyday questions at each strength, read "
        "by the unsteered model (persona: nats/token more likely after the positive than the "
        "negative instruction)"
    )
    figures = ("strength", "persona", "vs unsteered", "tokens", "ended", "degenerate")
    for column in figures:
        table.add_column(column, justify="right", no_wrap=True)
    room = min(60, width - sum(len(c) + 3 for c in figures) - 4)  # padding and borders
    if room >= 20:
        table.add_column("first reply", width=room, overflow="ellipsis", no_wrap=True)
    reference = next(p.persona for p in points if p.strength == 0)
    for p in points:
        row = [f"{p.strength:+g}", f"{p.persona:+.3f}", f"{p.persona - reference:+.3f}"]
        row += [f"{p.tokens:.0f}", f"{p.ended:.0%}", f"{p.degenerate:.0%}"]
        table.add_row(*row, *([p.sample.replace("\n", " ")] if room >= 20 else []))
    return table


def chat_loop_warnings(points: list[ChatPoint], recommended: list[float] | None) -> list[str]:
    """Recommended strengths at which more chat replies loop than unsteered, by more than
    chance explains: the range comes from probes and perplexity, which do not see a reply
    running into a loop."""
    from ..chateval import LOOPS_SIGNIFICANT, excess_loops_p

    if not points or not recommended:
        return []
    low, high = recommended
    unsteered = next(p for p in points if p.strength == 0)
    inside = [p for p in points if p.strength and low <= p.strength <= high]
    return [
        f"chat at {p.strength:+g}: {p.looping} of {p.replies} replies loop "
        f"({unsteered.looping} unsteered; chance alone: p = {chance:.2g}); "
        f"for chat, stay nearer 0 than {p.strength:+g}"
        for p, chance in ((p, excess_loops_p(p, unsteered)) for p in inside)
        if chance < LOOPS_SIGNIFICANT
    ]


def _verdict(report: EvalReport) -> None:
    from rich.markup import escape

    span, verdict = report.recommended, report.verdict
    max_ratio, min_effect = report.max_ppl_ratio, report.min_effect
    name, model = escape(report.concept), escape(report.model_name)
    limit = f"perplexity within {max_ratio}x of unsteered"
    if span:
        out.print(f"recommended strength: [bold]{span[0]:+g}..{span[1]:+g}[/] ({limit})")
        edges = report.recommended_at_sweep_edge or [False, False]
        at_edge = [f"{e:+g}" for e, at in zip(span, edges, strict=True) if at]
        if at_edge:
            out.print(
                f"[dim]{' and '.join(at_edge)}: the edge of the sweep, perplexity still within "
                "the limit there; widen --strengths to find where it ends[/]"
            )
    if span and verdict != "works":
        weak = [p for p in report.points if abs(p.strength) == 1]
        detail = ", ".join(f"{p.effect:+.2f} nats at {p.strength:+g}" for p in weak)
        out.print(
            f"[yellow]{name} is one-sided on {model} ({verdict}): {detail}; under "
            f"{min_effect} nats or of the wrong sign does not count[/]"
        )
    elif not span and verdict == "works":
        out.print(
            f"[bold red]no recommended strength[/]: the effect is right, but perplexity exceeds "
            f"{max_ratio}x at the smallest strengths: try e.g. --strengths "
            "-0.5..0.5:0.1"
        )
    elif not span:
        out.print(
            f"[bold red]{name} does not work on {model}[/]: no strength moves the probes by "
            f"{min_effect} nats in its own direction with {limit}"
        )
    if report.saved:
        err.print(f"[dim]stored the result in {escape(report.saved)}[/]")
    if report.plot:
        err.print(f"[dim]wrote {escape(report.plot)}[/]")


def chart(result: Sweep, limit: float, width: int = 18) -> Table:
    """Unicode bars: effect (diverging from 0) and perplexity ratio (from 1, `limit` marked)."""
    from rich.table import Table

    effects = [result.effect(p) for p in result.points]
    ratios = [result.ppl_ratio(p) for p in result.points]
    scale = max(map(abs, effects)) or 1.0
    top = max(max(ratios), limit * 1.2)
    mark = round((limit - 1) / (top - 1) * width)
    table = Table(box=None)
    table.add_column("strength", justify="right")
    table.add_column(f"{'- effect':<{width}}│{'effect +':>{width}}")
    table.add_column(f"perplexity ratio from x1 (┆ x{limit})")
    for p, effect, ratio in zip(result.points, effects, ratios, strict=True):
        left = _bar(-effect / scale, width, leftward=True) if effect < 0 else " " * width
        right = _bar(effect / scale, width) if effect > 0 else " " * width
        ppl = _bar(max(0.0, ratio - 1) / (top - 1), width)
        ppl = ppl[:mark] + ("┆" if ppl[mark] == " " else ppl[mark]) + ppl[mark + 1 :]
        colour = "red" if ratio > limit else "cyan"
        table.add_row(f"{p.strength:+g}", f"[magenta]{left}│{right}[/]", f"[{colour}]{ppl}[/]")
    return table


def _bar(fraction: float, width: int, *, leftward: bool = False) -> str:
    """A bar of `fraction` x `width` cells at half-cell resolution."""
    full, half = divmod(round(min(fraction, 1.0) * width * 2), 2)
    if leftward:
        return (("▐" if half else "") + "█" * full).rjust(width)
    return ("█" * full + ("▌" if half else "")).ljust(width)
