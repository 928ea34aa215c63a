"""Run `eval` and `bench` on the demo model and the tiny models; write docs/results.md.

The eval runs in this process through the functions `edge-steer eval` uses, on vectors trained
afresh with the defaults (nothing is read from or written to the vector store). The bench runs
`edge-steer bench --json` in a child process per model, so each peak RSS is the bench's own.

Writes `tools/results/eval-<model>.png` (effect and perplexity against strength, one line per
concept), `tools/results/eval.json` and `bench.json` (every figure), and rewrites the
generated blocks of docs/results.md (eval and bench separately, between their markers, so
`--no-bench` keeps the old speed figures).

    python tools/results.py                                  # everything (tens of minutes)
    python tools/results.py --eval-models demo --concepts happy,lazy --strengths=-1..1 --no-bench
    python tools/results.py --bench-models demo --reps 3 --no-eval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_steer import bench, catalog, chateval, dataset, evaluate, model_files, training, vectors  # noqa: E402
from edge_steer.engine import Model  # noqa: E402
from edge_steer.errors import EdgeSteerError  # noqa: E402
from tools.tiny_models import write_tiny_model  # noqa: E402

PARTS = ("eval", "bench")  # generated blocks, each between its own markers, rewritten alone
TINY = {"tiny-dense": False, "tiny-moe": True}  # name -> MoE


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def model_path(name: str, folder: Path) -> Path:
    """'demo', 'tiny-dense', 'tiny-moe' (generated into `folder`) or a GGUF path."""
    if name in TINY:
        return write_tiny_model(folder / f"{name}.gguf", moe=TINY[name])
    return model_files.resolve_model(name)


def display_name(name: str, model: Model) -> str:
    """The catalog's title for catalog models ("SmolLM2 135M Instruct"), else the file's
    own name (the demo chat model's general.name is "Smollm2 135M 8k Lc100K Mix1 Ep2")."""
    try:
        return catalog.lookup(name).title.split(" (")[0]
    except EdgeSteerError:
        return model.name


def run_bench(path: Path, args: argparse.Namespace) -> dict:
    """`edge-steer bench --json` in its own process: its peak RSS is then the bench's own."""
    command = [sys.executable, "-m", "edge_steer", "bench", "--model", str(path), "--json"]
    command += ["--reps", str(args.reps), "--pairs", str(args.pairs)]
    command += ["--threads", str(args.threads)] if args.threads else []
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}  # this checkout's edge_steer
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"edge-steer bench failed on {path}:\n{result.stderr}")
    return json.loads(result.stdout)


# -- eval ----------------------------------------------------------------------------------------


def eval_model(model: Model, args: argparse.Namespace, chat: bool) -> dict:
    """Train and sweep every concept; the baseline too on real models (not the tiny ones);
    with `chat`, also `eval --chat`."""
    settings = evaluate.EvalSettings(
        strengths=evaluate.parse_strengths(args.strengths), samples=args.samples
    )
    span = (1, model.n_layer - 1)  # the vector's own blocks
    rows_out, sweeps = [], {}
    for name in args.concepts:
        concept = dataset.load_builtin(name)
        start = time.perf_counter()
        pairs = dataset.contrast_pairs(concept, model, limit=args.pairs)
        options = training.TrainOptions(threads=args.threads)
        vector = training.train(model, pairs, options, name=name)
        rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
        personas = None if args.no_baseline else dataset.persona_prefixes(concept, model)[0]
        with evaluate.context(model, args.threads) as ctx:
            result = evaluate.sweep(ctx, rows, span, concept.probes, settings, personas=personas)
        sweeps[name] = result
        rows_out.append(_eval_row(name, vector, result))
        if chat and args.chat_strengths:
            rows_out[-1]["chat"] = _chat_points(model, rows, span, concept, args)
        log(
            f"  {model.name} {name}: {evaluate.verdict(result)}, "
            f"range {evaluate.recommend(result)} ({time.perf_counter() - start:.0f}s)"
        )
    return {"rows": rows_out, "sweeps": sweeps}


def _chat_points(
    model: Model, rows, span: tuple[int, int], concept: dataset.Concept, args: argparse.Namespace
) -> list[dict]:
    """`eval --chat`'s replies and scores at `--chat-strengths` (0 included)."""
    strengths = evaluate.parse_strengths(args.chat_strengths)
    found = chateval.chat_sweep(model, rows, span, concept, strengths, threads=args.threads)
    return [
        {
            "strength": p.strength,
            "persona": round(p.persona, 4),
            "tokens": round(p.tokens, 1),
            "ended": p.ended,
            "degenerate": p.degenerate,
            "sample": p.sample,
            "replies": p.replies,
        }
        for p in found
    ]


def _eval_row(name: str, vector: vectors.ControlVector, result: evaluate.Sweep) -> dict:
    def point(p: evaluate.Point | None) -> dict | None:
        if p is None:
            return None
        return {
            "strength": p.strength,
            "effect": round(result.effect(p), 3),
            "ppl_ratio": round(result.ppl_ratio(p), 4),
            "degenerate": p.degenerate,
        }

    span = evaluate.recommend(result)
    return {
        "concept": name,
        "layers": [vector.layers[0], vector.layers[-1]],
        "verdict": evaluate.verdict(result),
        "recommended": span,
        "edge": evaluate.at_sweep_edge(result, span) if span else None,
        "minus": point(result.nearest(-1.0)),
        "plus": point(result.nearest(1.0)),
        "baseline": [point(p) for p in result.baseline],
        "points": [point(p) for p in result.points],
    }


# -- markdown ------------------------------------------------------------------------------------


EVAL_LEGEND = (
    "Effect = change of the mean log-probability margin of the positive over the negative "
    "continuation on the concept's held-out probes (nats); ppl = perplexity ratio on neutral "
    "text; degenerate = share of sampled continuations that loop (`metrics.is_degenerate`); "
    "prompt = the unsteered model given the persona as a prompt instead of a vector; "
    "recommended = `evaluate.recommend` (perplexity within "
    f"{evaluate.MAX_PPL_RATIO}x, effect of the right sign and at least {evaluate.MIN_EFFECT} nats)"
    " over the strengths {strengths} (`edge-steer eval`'s default is whole steps, "
    f"{evaluate.DEFAULT_STRENGTHS})."
)
RANDOM_NOTE = (
    " (random weights: this only shows that the pipeline runs on a model of this shape; "
    "the figures say nothing about language)"
)


def eval_markdown(name: str, model_name: str, rows: list[dict], plot: str | None) -> list[str]:
    lines = [
        f"**{model_name}**{RANDOM_NOTE if name in TINY else ''}",
        "",
        "| concept | blocks | effect -1 / +1 | ppl -1 / +1 | degenerate -1 / +1 | prompt -/+ "
        "(effect, ppl) | recommended | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        minus, plus = r["minus"] or {}, r["plus"] or {}
        base = {b["strength"]: b for b in r["baseline"]}
        prompt = (
            " / ".join(
                f"{b['effect']:+.2f}, x{b['ppl_ratio']:.2f}"
                for b in (base.get(-1.0), base.get(1.0))
                if b
            )
            or "-"
        )
        span = r["recommended"]
        lines.append(
            f"| {r['concept']} | {r['layers'][0]}-{r['layers'][1]} "
            f"| {minus.get('effect', 0):+.2f} / {plus.get('effect', 0):+.2f} "
            f"| x{minus.get('ppl_ratio', 1):.3f} / x{plus.get('ppl_ratio', 1):.3f} "
            f"| {minus.get('degenerate', 0):.0%} / {plus.get('degenerate', 0):.0%} "
            f"| {prompt} | {f'{span[0]:+g}..{span[1]:+g}' if span else 'none'} "
            f"| {'**' + r['verdict'] + '**' if r['verdict'] != 'works' else 'works'} |"
        )
    lines += ["", *_eval_notes(rows)]
    if plot:
        lines += ["", f"![eval on {model_name}]({plot})"]
    return lines


CHAT_LEGEND = (
    "What a chat user sees (`edge-steer eval --chat`): the steered model answers each of the "
    f"eight questions of `concepts/chat_questions.txt` {chateval.REPLIES} times in its chat "
    f"format ({chateval.REPLY_TOKENS} sampled tokens, same seeds at every strength); persona = "
    "mean per-token log P(reply | positive persona instruction) - log P(reply | negative one), "
    "read by the unsteered model (it should rise with the strength); loops = how many of the "
    "replies degenerate (`metrics.is_degenerate`); ended = share that end their turn."
)


def chat_markdown(model_name: str, rows: list[dict]) -> list[str]:
    """The chat-eval table, one row per concept; [] when no row was measured in chat."""
    measured = [r for r in rows if r.get("chat")]
    if not measured:
        return []
    strengths = [p["strength"] for p in measured[0]["chat"]]
    heads = " / ".join(f"{s:+g}" for s in strengths)
    lines = [
        f"**{model_name}**, chat replies: {CHAT_LEGEND}",
        "",
        f"| concept | persona {heads} | loops {heads} | ended {heads} | reply at "
        f"{strengths[0]:+g} | reply at {strengths[-1]:+g} |",
        "|---|---|---|---|---|---|",
    ]
    for r in measured:
        points = r["chat"]

        def cells(key: str, form: str, points: list[dict] = points) -> str:
            return " / ".join(format(p[key], form) for p in points)

        loops = " / ".join(str(_loops(p)) for p in points) + f" of {points[0]['replies']}"

        def quote(text: str) -> str:
            return "“" + " ".join(text.split())[:90].replace("|", "/") + "…”"

        lines.append(
            f"| {r['concept']} | {cells('persona', '+.3f')} | {loops} "
            f"| {cells('ended', '.0%')} | {quote(points[0]['sample'])} "
            f"| {quote(points[-1]['sample'])} |"
        )
    return [*lines, "", *_chat_notes(measured)]


def _loops(point: dict) -> int:
    """How many of a chat point's replies loop."""
    return round(point["degenerate"] * point["replies"])


def _chat_notes(rows: list[dict]) -> list[str]:
    """Where the persona score does not rise through 0, and where steering adds loops."""
    falling, loops = [], []
    for r in rows:
        points = sorted(r["chat"], key=lambda p: p["strength"])
        zero = next(p for p in points if p["strength"] == 0)
        scores = [p["persona"] for p in points]
        if scores != sorted(scores):
            falling.append(r["concept"] + " (" + " / ".join(f"{x:+.3f}" for x in scores) + ")")
        for p in points:
            if _loops(p) > _loops(zero):
                chance = chateval.excess_loops_p(
                    chateval.ChatPoint(**p), chateval.ChatPoint(**zero)
                )
                note = f"{r['concept']} {p['strength']:+g} ({_loops(p)} of {p['replies']}"
                loops.append((f"{note}, chance alone p = {chance:.2g})", chance))
    rising = len(rows) - len(falling)
    text = f"The persona score rises with the strength in {rising} of {len(rows)} concepts"
    text += f"; not in {', '.join(falling)}." if falling else "."
    if not loops:
        return [text + " No strength makes more replies loop than unsteered."]
    beyond = [note for note, chance in loops if chance < chateval.LOOPS_SIGNIFICANT]
    text += f" More looping replies than unsteered: {', '.join(note for note, _ in loops)}"
    text += f"; more than chance explains (p < {chateval.LOOPS_SIGNIFICANT:g}): "
    return [text + (", ".join(beyond) if beyond else "none") + "."]


def _eval_notes(rows: list[dict]) -> list[str]:
    """What the table cannot say at a glance: one-sided concepts, ranges cut by the sweep."""
    notes = []
    for r in rows:
        if r["verdict"] != "works":
            at = ", ".join(
                f"{p['effect']:+.2f} nats at {p['strength']:+g}"
                for p in (r["minus"], r["plus"])
                if p
            )
            notes.append(f"{r['concept']} ({r['verdict']}: {at})")
    lines = [f"Not working both ways on this model: {'; '.join(notes)}."] if notes else []
    edges = {
        e
        for r in rows
        if r["recommended"]
        for e, at in zip(r["recommended"], r["edge"], strict=True)
        if at
    }
    if edges:
        ends = " and ".join(f"{e:+g}" for e in sorted(edges))
        lines.append(
            f"Ranges ending at {ends} end at the edge of the sweep: perplexity is still within "
            f"{evaluate.MAX_PPL_RATIO}x there, so the limit lies further out."
        )
    return lines


def bench_markdown(reports: list[dict]) -> list[str]:
    lines = [
        "| model | test | engine | + 1 vector | + 3 vectors | bare `llama_decode` loop |",
        "|---|---|---|---|---|---|",
    ]
    for rep in reports:
        by = {(r["test"], r["variant"]): r for r in rep["results"]}
        tests = dict.fromkeys(r["test"] for r in rep["results"] if r["test"] != "capture")
        for test in tests:
            cells = [
                f"{by[test, v]['tps_mean']:.1f} ± {by[test, v]['tps_sd']:.1f}"
                for v in (
                    "engine",
                    "engine + 1 vector",
                    "engine + 3 vectors",
                    "bare llama_decode loop",
                )
            ]
            lines.append(f"| {rep['model']} | {test} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | tg 1 vector / none | tg 3 vectors / none | tg engine / bare | capture / pp "
        "| train (s) | peak RSS | threads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rep in reports:
        r, t = rep["ratios"], rep["training"]
        cells = [
            f"{r[k]['value']:.3f}"
            for k in (
                "tg: 1 vector / none",
                "tg: 3 vectors / none",
                "tg: engine / bare loop",
                "capture / prompt processing",
            )
        ]
        lines.append(
            f"| {rep['model']} | "
            + " | ".join(cells)
            + f" | {t['train_s_mean']:.1f} ({t['pairs']} pairs, {t['concept']}) "
            f"| {rep['peak_rss_bytes'] / 2**20:.0f} MiB | {rep['backend']['threads']} |"
        )
    targets = ", ".join(f"{k} >= {v}" for k, v in bench.TARGETS.items())
    machine = "; ".join(
        f"{rep['model']}: 1-min load {rep['loadavg'][0]} before, {rep['loadavg'][1]} after"
        for rep in reports
    )
    info = reports[0]["backend"]["system_info"] if reports else ""
    tiny = "The tiny models spend well under a millisecond per token, so timer and Python noise "
    tiny += "dominate their ratios; the targets are about real models."
    return [
        *lines,
        "",
        f"Targets: {targets}. Machine: {os.cpu_count()} CPUs, llama.cpp `{info}`; {machine}.",
        *([tiny] if any(r["model"].startswith("tiny") for r in reports) else []),
    ]


def markers(part: str) -> tuple[str, str]:
    return f"<!-- results:{part}:begin -->", f"<!-- results:{part}:end -->"


def write_doc(doc: Path, part: str, body: list[str]) -> None:
    """Replace one part's block; the first time, the Results section becomes the blocks."""
    text = doc.read_text(encoding="utf-8")
    if markers(part)[0] not in text:
        empty = "\n\n".join("\n".join(markers(p)) for p in PARTS)
        if "\n## Results\n" in text:
            head, rest = text.split("\n## Results\n", 1)
            tail = rest[rest.find("\n## ") :] if "\n## " in rest else "\n"
            text = head + "\n## Results\n\n" + empty + "\n" + tail
        else:
            text = text.rstrip("\n") + "\n\n## Results\n\n" + empty + "\n"
    begin, end = markers(part)
    head, rest = text.split(begin, 1)
    text = head + "\n".join([begin, *body, end]) + rest.split(end, 1)[1]
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, doc)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-models", default="demo,demo-chat,tiny-dense,tiny-moe")
    p.add_argument("--bench-models", default="demo,tiny-dense,tiny-moe")
    p.add_argument("--concepts", default="all", help="comma list of built-in concepts, or all")
    p.add_argument("--strengths", default="-2..2:0.5")  # finer than eval's default
    p.add_argument(
        "--chat-strengths", default="-1,1", help="eval --chat on chat models; '' to skip"
    )
    p.add_argument("--samples", type=int, default=8, help="sampled generations per strength")
    p.add_argument("--pairs", type=int, default=128, help="training pairs per concept")
    p.add_argument("--reps", type=int, default=5, help="bench repetitions")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--no-baseline", action="store_true", help="skip the persona-prompt baseline")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    args = p.parse_args(argv)
    names = dataset.builtin_names()
    args.concepts = names if args.concepts == "all" else args.concepts.split(",")
    for name in args.concepts:
        dataset.load_builtin(name)  # unknown names fail now
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-steer-results-") as tmp:
        if not args.no_eval:
            legend = EVAL_LEGEND.format(strengths=args.strengths)
            body, raw = [_command_line(argv), "", legend, ""], {}
            for name in args.eval_models.split(","):
                model = Model(model_path(name, Path(tmp)))
                label = display_name(name, model)
                log(f"eval on {label}")
                # the tiny models carry a chat template, but random weights write no replies
                found = eval_model(model, args, bool(model.chat_template) and name not in TINY)
                raw[name] = found["rows"]
                plot = _plot(found["sweeps"], label, name, args)
                body += [*eval_markdown(name, label, found["rows"], plot), ""]
                body += [*chat_markdown(label, found["rows"]), ""]
            _write_json(args.out / "eval.json", raw)
            write_doc(args.doc, "eval", ["## Does it work? `edge-steer eval`", "", *body])
        if not args.no_bench:
            reports = []
            for name in args.bench_models.split(","):
                log(f"bench on {name}")
                reports.append(run_bench(model_path(name, Path(tmp)), args))
            _write_json(args.out / "bench.json", reports)
            body = [_command_line(argv), "", *bench_markdown(reports), ""]
            write_doc(args.doc, "bench", ["## Speed: `edge-steer bench`", "", *body])
    log(f"wrote {args.doc} and {args.out}")
    return 0


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _plot(sweeps: dict, model_name: str, name: str, args: argparse.Namespace) -> str | None:
    """The PNG (its path relative to the results document), or None without matplotlib."""
    from edge_steer import plot

    target = args.out / f"eval-{name}.png"
    try:
        path = plot.write(target, sweeps, f"built-in concepts on {model_name}")
    except EdgeSteerError as exc:  # the plot extra is missing: keep the figures anyway
        log(f"no plot: {exc}")
        return None
    return os.path.relpath(path, args.doc.resolve().parent)


def _command_line(argv: list[str] | None) -> str:
    args = " ".join(sys.argv[1:] if argv is None else argv)
    return f"Generated by `python tools/results.py {args}`.".replace(" `.", "`.")


if __name__ == "__main__":
    sys.exit(main())
