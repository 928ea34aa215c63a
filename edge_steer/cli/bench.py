"""`edge-steer bench`: llama-bench-style speed figures for steering, the engine and training."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from ..constants import DEFAULT_CTX
from ..errors import BadInput
from ..files import size_text
from .options import (
    LOAD,
    JsonOpt,
    clean_errors,
    err,
    load_model,
    out,
    print_json,
    progress_bar,
    with_options,
)

VERDICTS = {
    True: "[green]ok[/]",
    False: "[red]below target[/]",
    None: "[yellow]within the noise: rerun with more --reps on a quiet machine[/]",
}


def _noise(noise: float | None) -> str:
    return "?" if noise is None else f"{noise:.3f}"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


@clean_errors
@with_options(LOAD)
def bench_command(
    reps: Annotated[int, typer.Option("--reps", "-r", help="Measured repetitions.")] = 5,
    pp: Annotated[int, typer.Option("--pp", help="Prompt tokens for the pp test.")] = 512,
    tg: Annotated[int, typer.Option("--tg", help="Tokens to generate for the tg test.")] = 128,
    concept: Annotated[str, typer.Option("--concept", help="Concept to train.")] = "happy",
    pairs: Annotated[int, typer.Option("--pairs", help="Training pairs.")] = 128,
    ctx: Annotated[int, typer.Option("--ctx", help="Context size in tokens.")] = DEFAULT_CTX,
    as_json: JsonOpt = False,
    *,
    opts,
) -> None:
    """Tokens/s with no, one and three vectors, against a bare llama_decode loop; training."""
    from .. import bench, dataset

    if concept.strip().lower() not in dataset.builtin_names():  # now, not after minutes
        builtin = ", ".join(dataset.builtin_names())
        raise BadInput(f"--concept {concept!r}: bench trains a built-in concept: {builtin}")
    settings = bench.BenchSettings(
        pp=pp,
        tg=tg,
        reps=reps,
        concept=concept,
        pairs=pairs,
        n_ctx=ctx,
        threads=opts.threads,
        gpu_layers=opts.gpu_layers or "auto",
        moe_offload=opts.moe_offload or "auto",
    )
    loaded = load_model(opts, ctx)
    label = f"benchmarking {loaded.name}"
    with progress_bar() as on_progress:
        report = bench.run(loaded, settings, lambda done, total: on_progress(label, done, total))
    for warning in report["warnings"]:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if as_json:
        print_json(report)
    else:
        render(report)


def render(report: dict) -> None:
    from rich.table import Table

    b, s = report["backend"], report["settings"]
    weights = ", ".join(f"{name} {size_text(size)}" for name, size in b["buffers"].items())
    out.print(
        f"[bold]{escape(report['model'])}[/] · {b['model_bytes'] / 2**20:.0f} MiB · "
        f"{b['threads']} threads · --gpu-layers {b['gpu_layers']} "
        f"--moe-offload {b['moe_offload']} · weights in {weights} "
        f"(GPU: {', '.join(b['gpu_backends']) or 'none compiled in'}) · "
        f"n_ctx {s['n_ctx']} · n_batch {s['n_batch']} · {s['reps']} reps\n"
        f"[dim]{b['system_info']}[/]"
    )
    table = Table(title="tokens/s, mean ± sd")
    for column in ("test", "variant", "t/s"):
        table.add_column(column, justify="right" if column == "t/s" else "left")
    for row in report["results"]:
        table.add_row(row["test"], row["variant"], f"{row['tps_mean']:.2f} ± {row['tps_sd']:.2f}")
    out.print(table)
    t = report["training"]
    out.print(
        f"training {t['concept']!r}: {t['pairs']} pairs, {t['prompt_tokens']} prompt tokens, "
        f"{t['train_s_mean']:.2f} ± {t['train_s_sd']:.2f} s"
    )
    for name, r in report["ratios"].items():
        mark = ""
        if "target" in r:
            mark = f" (target >= {r['target']}) {VERDICTS[r['ok']]}"
        out.print(
            f"{name}: [bold]{r['value']:.3f}[/] ± {_noise(r['noise'])} "
            f"(paired median {r['paired_median']:.3f}){mark}"
        )
    c = report["checks"]
    out.print(
        f"steered output differs: {c['steered_differs']} · engine tokens = bare loop tokens: "
        f"{c['engine_matches_bare']} · peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
