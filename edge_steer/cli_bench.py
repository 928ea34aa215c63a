"""`edge-steer bench`: llama-bench-style speed figures for steering, the engine and training."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from .cli import (
    DEFAULT_MODEL,
    ForceOpt,
    GpuOpt,
    JsonOpt,
    ModelOpt,
    MoeOpt,
    ThreadsOpt,
    _load_model,
    _progress,
    app,
    clean_errors,
    err,
    out,
)


@app.command("bench")
@clean_errors
def bench_command(
    model: ModelOpt = DEFAULT_MODEL,
    reps: Annotated[int, typer.Option("--reps", "-r", help="Measured repetitions.")] = 5,
    pp: Annotated[int, typer.Option("--pp", help="Prompt tokens for the pp test.")] = 512,
    tg: Annotated[int, typer.Option("--tg", help="Tokens to generate for the tg test.")] = 128,
    concept: Annotated[str, typer.Option("--concept", help="Concept to train.")] = "happy",
    pairs: Annotated[int, typer.Option("--pairs", help="Training pairs.")] = 128,
    ctx: Annotated[int, typer.Option("--ctx", help="Context size in tokens.")] = 4096,
    threads: ThreadsOpt = None,
    gpu_layers: GpuOpt = None,
    moe_offload: MoeOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokens/s with no, one and three vectors, against a bare llama_decode loop; training."""
    from . import bench, dataset

    dataset.load_builtin(concept)  # unknown names fail now, not after minutes of measuring
    settings = bench.BenchSettings(
        pp=pp,
        tg=tg,
        reps=reps,
        concept=concept,
        pairs=pairs,
        n_ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers or "auto",
        moe_offload=moe_offload or "auto",
    )
    loaded = _load_model(model, gpu_layers, moe_offload, ctx, force)
    with _progress(f"benchmarking {loaded.name}") as progress:
        report = bench.run(loaded, settings, progress)
    for warning in report["warnings"]:
        err.print(f"[bold yellow]warning:[/] {warning}")
    if as_json:
        print(json.dumps(report))
    else:
        render(report)


def render(report: dict) -> None:
    b, s = report["backend"], report["settings"]
    out.print(
        f"[bold]{report['model']}[/] · {b['model_bytes'] / 2**20:.0f} MiB · "
        f"{b['threads']} threads · --gpu-layers {b['gpu_layers']} "
        f"--moe-offload {b['moe_offload']} · weights {b['buffers']} "
        f"(GPU offload {'available' if b['gpu_offload_supported'] else 'not built in'}) · "
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
            verdict = "[green]ok[/]" if r["ok"] else "[red]below target[/]"
            mark = f" (target >= {r['target']}) {verdict}"
        out.print(
            f"{name}: [bold]{r['value']:.3f}[/] (paired median {r['paired_median']:.3f}){mark}"
        )
    c = report["checks"]
    out.print(
        f"steered output differs: {c['steered_differs']} · engine tokens = bare loop tokens: "
        f"{c['engine_matches_bare']} · peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
