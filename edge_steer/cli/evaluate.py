"""`edge-steer eval`: does a vector work, and at what strength? Table, chart, plot, JSON."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import BadInput
from .options import (
    LOAD,
    JsonOpt,
    LayersOpt,
    RetrainOpt,
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

    from ..evaluate import Sweep


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
        typer.Option("--personas", help="POSITIVE,NEGATIVE persona words for --baseline."),
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
    as_json: JsonOpt = False,
    *,
    opts,
) -> None:
    """Measure a vector's effect and fluency cost over strengths; recommend a range."""
    from .. import dataset, evaluate, steering
    from ..vectors import Key

    points = evaluate.parse_strengths(strengths or evaluate.DEFAULT_STRENGTHS)
    if samples < 0 or sample_tokens < 1:
        raise BadInput("--samples must be 0 or more and --sample-tokens at least 1")
    if plot:
        from .. import plot as plotting

        plotting.require()
    probe_set = dataset.load_probes_jsonl(probes) if probes else None
    _vector_name(vector)  # a bad spec fails before the model loads
    loaded = load_model(opts, evaluate.EVAL_CTX)
    if chat:
        from ..chateval import require_chat

        require_chat(loaded)  # before training or sweeping, not after
    path, vec = _load(vector, loaded, retrain)
    concept = str(vec.metadata.get(Key.CONCEPT) or path.stem)
    probe_set = probe_set or _builtin_probes(concept)
    words, prefixes = _personas(loaded, concept, personas) if baseline or personas else (None, None)
    span = steering.parse_layers(layers, loaded.n_layer)
    settings = evaluate.EvalSettings(
        strengths=points,
        samples=samples,
        sample_tokens=sample_tokens,
        sampler=replace(evaluate.SAMPLING, seed=seed),
        refine=strengths is None,
    )
    result = _sweep(loaded, vec, span, probe_set, settings, prefixes, opts.threads, concept)
    layer_text = f"{span[0]}-{span[1]}" if span else "all"
    if save:
        evaluate.save(path, result, loaded, layer_text)
    if plot:
        plotting.write(plot, {concept: result}, f"{concept} on {loaded.name} (blocks {layer_text})")
    report = _report(result, loaded, vec, path, concept, span, words, prefixes, len(probe_set))
    report["saved"] = str(path) if save else None
    report["plot"] = plot
    report["chat"] = (
        _chat(loaded, vec, span, concept, personas, result, seed, opts) if chat else None
    )
    if as_json:
        print_json(report)
    else:
        _render(result, report)


def _load(spec: str, model, retrain: bool):
    """The vector's file and contents (built-in concepts are trained on first use)."""
    from .. import runtime, vectors

    with progress_bar() as on_progress:
        path = runtime.vector_file(
            model, _vector_name(spec), retrain=retrain, on_progress=on_progress
        )
    vector = vectors.read(path)
    vectors.check_fits(vector, model.n_layer, model.n_embd, str(path))
    return path, vector


def _vector_name(spec: str) -> str:
    from .. import vectors

    name, _ = vectors.parse_spec(spec)
    if name != spec.strip():
        raise BadInput(f"give the vector without a strength ({name}): --strengths sets them")
    return name


def _sweep(model, vector, span, probes, settings, prefixes, threads, concept) -> Sweep:
    from .. import evaluate, vectors

    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    label = f"evaluating {concept!r} on {model.name}"
    with evaluate.context(model, settings, threads) as ctx, progress_bar() as on_progress:
        return evaluate.sweep(
            ctx,
            rows,
            span or (1, model.n_layer - 1),
            probes,
            settings,
            personas=prefixes,
            progress=lambda done, total: on_progress(label, done, total),
        )


def _chat(model, vector, span, concept: str, personas, result: Sweep, seed: int, opts) -> list:
    """`chateval.chat_sweep` at the probe sweep's strengths, as JSON-ready points."""
    from dataclasses import asdict

    from .. import chateval, vectors

    definition = _definition(concept, personas, "--chat")
    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    strengths = [p.strength for p in result.points]
    label = f"chat replies under {concept!r}"
    with progress_bar() as on_progress:
        found = chateval.chat_sweep(
            model,
            rows,
            span or (1, model.n_layer - 1),
            definition,
            strengths,
            seed=seed,
            threads=opts.threads,
            progress=lambda done, total: on_progress(label, done, total),
        )
    return [
        {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()} for p in found
    ]


def _chat_table(report: dict) -> Table:
    from rich.table import Table

    table = Table(
        title="chat replies to everyday questions, read by the unsteered model "
        "(persona: nats/token more likely after the positive than the negative instruction)"
    )
    for column in ("strength", "persona", "vs unsteered", "tokens", "ended", "degenerate"):
        table.add_column(column, justify="right")
    table.add_column("first reply", justify="left", max_width=60, overflow="ellipsis", no_wrap=True)
    reference = next(p["persona"] for p in report["chat"] if p["strength"] == 0)
    for p in report["chat"]:
        table.add_row(
            f"{p['strength']:+g}",
            f"{p['persona']:+.3f}",
            f"{p['persona'] - reference:+.3f}",
            f"{p['tokens']:.0f}",
            f"{p['ended']:.0%}",
            f"{p['degenerate']:.0%}",
            p["sample"].replace("\n", " "),
        )
    return table


def _builtin_probes(concept: str):
    from .. import dataset

    if concept.lower() not in dataset.builtin_names():
        raise BadInput(
            f"no probes for concept {concept!r}: pass --probes FILE.jsonl with one "
            '{"prompt": ..., "positive": ..., "negative": ...} per line'
        )
    return dataset.load_builtin(concept).probes


def _personas(model, concept: str, personas: str | None):
    """(positive, negative) persona words and their prompt texts, as used in training."""
    from .. import dataset

    definition = _definition(concept, personas, "--baseline")
    words = (definition.positive[0], definition.negative[0])
    return words, dataset.persona_prefixes(definition, model)[0]


def _definition(concept: str, personas: str | None, flag: str):
    """The concept's persona words: --personas, or the built-in concept's."""
    from .. import dataset

    if personas:
        positive, _, negative = personas.partition(",")
        return dataset.from_personas(concept, positive, negative)
    if concept.lower() in dataset.builtin_names():
        return dataset.load_builtin(concept)
    raise BadInput(
        f"{flag} needs persona words for the custom concept {concept!r}: "
        "add --personas 'POSITIVE,NEGATIVE', e.g. --personas 'sarcastic,sincere'"
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _report(result, model, vector, path, concept, span, words, prefixes, n_probes) -> dict:
    from .. import evaluate
    from ..vectors import Key

    recommended = evaluate.recommend(result)

    def point(p) -> dict:
        return {
            "strength": p.strength,
            "effect": round(result.effect(p), 4),
            "margin": round(p.margin, 4),
            "perplexity": round(p.perplexity, 4),
            "ppl_ratio": round(result.ppl_ratio(p), 4),
            "effect_per_cost": _rounded(result.effect_per_cost(p)),
            "degenerate": p.degenerate,
            "sample": p.sample,
        }

    baseline = [
        {**point(p), "persona": word, "prompt": prefix}
        for p, word, prefix in zip(result.baseline, words or (), prefixes or (), strict=False)
    ]
    return {
        "model": str(model.path),
        "model_name": model.name,
        "vector": str(path),
        "calibration": {
            "budget": vector.metadata.get(Key.CALIBRATION_BUDGET),
            "scale": vector.metadata.get(Key.CALIBRATION_SCALE),
        },
        "concept": concept,
        "layers": list(span) if span else None,
        "probes": n_probes,
        "points": [
            {**point(p), "in_range": _in_range(p.strength, recommended)} for p in result.points
        ],
        "baseline": baseline,
        "recommended": list(recommended) if recommended else None,
        "recommended_at_sweep_edge": (
            list(evaluate.at_sweep_edge(result, recommended)) if recommended else None
        ),
        "verdict": evaluate.verdict(result),
        "max_ppl_ratio": evaluate.MAX_PPL_RATIO,
        "min_effect": evaluate.MIN_EFFECT,
    }


def _in_range(strength: float, span: tuple[float, float] | None) -> bool:
    return span is not None and span[0] <= strength <= span[1]


# -- rendering ---------------------------------------------------------------------------------


def _render(result: Sweep, report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    out.print(
        f"[bold]{escape(report['concept'])}[/] on {escape(report['model_name'])} · "
        f"{report['probes']} probes · "
        f"blocks {'-'.join(map(str, report['layers'])) if report['layers'] else 'all'}"
    )
    table = Table(title="effect on held-out probes and cost on neutral text")
    columns = ("strength", "effect (nats)", "perplexity", "ratio", "effect/cost", "degenerate")
    for column in (*columns, "range"):
        table.add_column(column, justify="right")
    for p in report["points"]:
        style = (
            "green"
            if p["in_range"]
            else ("red" if p["ppl_ratio"] > report["max_ppl_ratio"] else "")
        )
        table.add_row(
            f"{p['strength']:+g}",
            f"{p['effect']:+.2f}",
            f"{p['perplexity']:.2f}",
            f"x{p['ppl_ratio']:.3f}",
            "" if p["effect_per_cost"] is None else f"{p['effect_per_cost']:+.1f}",
            f"{p['degenerate']:.0%}",
            "✓" if p["in_range"] else "",
            style=style,
        )
    out.print(table)
    calibration = report["calibration"]
    if calibration["scale"] is not None:
        out.print(
            f"[dim]calibrated: ±1 = x{calibration['budget']} perplexity on held-in text "
            f"(scale {calibration['scale']:g}); effect/cost = nats per nat of perplexity[/]"
        )
    out.print(chart(result, report["max_ppl_ratio"]))
    if report["baseline"]:
        out.print(_baseline_table(report))
    if report["chat"]:
        out.print(_chat_table(report))
    _verdict(report)


def _baseline_table(report: dict) -> Table:
    from rich.table import Table

    table = Table(title="the persona as a prompt instead of a vector (unsteered)")
    for column in ("prompt", "effect (nats)", "ratio", "degenerate", "vector at same sign"):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    by_strength = {p["strength"]: p for p in report["points"]}
    for b in report["baseline"]:
        same = by_strength.get(b["strength"])
        vector = f"{same['effect']:+.2f}, x{same['ppl_ratio']:.3f}" if same else "-"
        table.add_row(
            f"extremely {b['persona']} ({b['strength']:+g})",
            f"{b['effect']:+.2f}",
            f"x{b['ppl_ratio']:.3f}",
            f"{b['degenerate']:.0%}",
            vector,
        )
    return table


def _verdict(report: dict) -> None:
    from rich.markup import escape

    span, verdict = report["recommended"], report["verdict"]
    max_ratio, min_effect = report["max_ppl_ratio"], report["min_effect"]
    name, model = escape(report["concept"]), escape(report["model_name"])
    limit = f"perplexity within {max_ratio}x of unsteered"
    if span:
        out.print(f"recommended strength: [bold]{span[0]:+g}..{span[1]:+g}[/] ({limit})")
        edges = [
            f"{e:+g}" for e, at in zip(span, report["recommended_at_sweep_edge"], strict=True) if at
        ]
        if edges:
            out.print(
                f"[dim]{' and '.join(edges)}: the edge of the sweep, perplexity still within "
                "the limit there; widen --strengths to find where it ends[/]"
            )
    if span and verdict != "works":
        weak = [p for p in report["points"] if abs(p["strength"]) == 1]
        detail = ", ".join(f"{p['effect']:+.2f} nats at {p['strength']:+g}" for p in weak)
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
    if report["saved"]:
        err.print(f"[dim]stored the result in {escape(report['saved'])}[/]")
    if report["plot"]:
        err.print(f"[dim]wrote {escape(report['plot'])}[/]")


def chart(result: Sweep, limit: float, width: int = 18) -> Table:
    from rich.table import Table

    """Unicode bars: effect (diverging from 0) and perplexity ratio (from 1, `limit` marked)."""
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
