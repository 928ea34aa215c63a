"""Measure the full-size stand-ins (tools/standins.py) through edge-steer's real pipeline.

Per stand-in, at a fixed thread count (default 2):
- in one child process (`--child PATH`): model load time, logits finite, pp512 and tg128
  (engine, greedy), steering applied (a random vector changes greedy output), hidden-state
  capture tokens/s against plain prompt processing of the same prompts, and the memory
  it ended with (peak RSS, and resident anonymous vs file-backed bytes from /proc);
- whole commands, each its own process with its peak RSS from wait4: `edge-steer generate
  -p Hi -n 1` (start-up), `edge-steer train` on --train-limit pairs, then `generate` with the
  trained vector and a cheap `eval` of it;
- the fit check's prediction for the real file (catalog.Entry.ram_needed at --ctx 4096, the
  figure `doctor`, `models list` and `pull` use) against the measured peak RSS.

Machine load drifts (other users): the 1-minute load average is recorded around each step.

    python tools/bench_standins.py mistral-q4_k_m mixtral-q2_k [--threads 2] [--json OUT]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import standins

CTX = 4096
PP, TG = 512, 128
MIB = 1 << 20
PROBES = (
    {"prompt": "Tell me about your day.", "positive": "cheerful", "negative": "gloomy"},
    {"prompt": "How do you feel about the weather?", "positive": "joyful", "negative": "sad"},
)


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} load {_load()}: {text}", file=sys.stderr, flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _status() -> dict[str, int]:
    """Peak and current resident bytes of this process, by kind (/proc/self/status)."""
    fields = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[key] = int(value.split()[0]) * 1024
    return out


def _drop_file_pages(path: Path) -> int:
    """Unmap-free release of this process's resident pages of `path`'s memory map
    (madvise MADV_DONTNEED; they fault back in from the page cache when touched), then reset
    the peak-RSS counter. After loading, llama.cpp's CPU backend has copied ("repacked") most
    weights into its own buffers; the file pages it read them from stay resident, counted in
    RSS though never touched again and reclaimable. Dropping them leaves the working set.
    Returns the bytes of mapping advised."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target, advised = str(Path(path).resolve()), 0
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(begin, end - begin, 4) == 0:  # MADV_DONTNEED
                advised += end - begin
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return advised


# -- the child: everything in one loaded model ---------------------------------------------------


def _load_as_commands_do(path: Path):
    """The model on the CPU, mapped or read as `edge-steer` commands decide (repack.py)."""
    from edge_steer import offload
    from edge_steer.engine import Model

    return Model(path, mmap=offload.plan_model(path, "0", None, CTX).mmap)


def child(path: Path, threads: int, reps: int, capture_pairs: int) -> dict:
    """Load, speed, steering and capture measurements in this process."""
    import numpy as np

    from edge_steer import bench, library, steering, training
    from edge_steer.engine import Context

    result: dict = {"loadavg_before": _load()}
    start = time.perf_counter()
    model = _load_as_commands_do(path)
    result["load_s"] = round(time.perf_counter() - start, 2)
    result["buffers_mib"] = {k: round(v / MIB) for k, v in model.buffers.items()}
    result["memory_after_load"] = _status()
    result["file_pages_dropped"] = _drop_file_pages(path)
    settings = bench.BenchSettings(threads=threads)
    prompt = model.tokenize(bench.PROMPT)
    pp_tokens = bench.text_tokens(model, PP)
    with Context(model, n_ctx=CTX, n_batch=bench.BATCH, threads=threads) as ctx:
        ctx.ingest(prompt)
        logits = ctx.logits()
        result["logits_finite"] = bool(np.isfinite(logits).all())
        result["logits_std"] = float(logits.std())
        ctx.forget(0)
        _say(f"loaded in {result['load_s']} s; pp{PP} x{reps}")
        pp = [bench.engine_pp(ctx, None, pp_tokens)[0] for _ in range(reps)]
        _say(f"pp{PP}: {[round(PP / s, 1) for s in pp]} tok/s; tg{TG} x{reps}")
        tg_runs = [bench.engine_tg(ctx, None, prompt, TG) for _ in range(reps)]
        result[f"pp{PP}_tps"] = [round(PP / s, 2) for s in pp]
        result[f"tg{TG}_tps"] = [round(len(out) / s, 2) for s, out in tg_runs]
        result["memory_after_generation"] = _status()  # VmHWM: the working-set peak
        _say(f"tg{TG}: {result[f'tg{TG}_tps']} tok/s; steering")
        with tempfile.TemporaryDirectory() as tmp:
            norms = bench.hidden_norms(model, prompt, threads)
            spec = bench.random_vectors(model, norms, settings, Path(tmp))[:1]
            steered = bench.engine_tg(ctx, steering.build(model, spec, None), prompt, 16)[1]
        result["steering_changes_output"] = steered != tg_runs[0][1][:16]
    _say(f"capture of {capture_pairs} pairs")
    pairs = library.contrast_pairs(model, "happy", limit=capture_pairs)
    prompts = [p for pair in pairs for p in pair]
    options = training.TrainOptions(threads=threads)
    tokens = [model.tokenize(p, parse_special=True) for p in prompts]
    start = time.perf_counter()
    training.hidden_states(model, prompts, options)
    capture_s = time.perf_counter() - start
    plain_s = bench._plain(model, tokens, options)
    n = sum(map(len, tokens))
    result["capture"] = {
        "pairs": len(pairs),
        "tokens": n,
        "capture_tps": round(n / capture_s, 2),
        "plain_pp_tps": round(n / plain_s, 2),
        "seconds_per_pair": round(capture_s / len(pairs), 3),
    }
    result["memory_end"] = _status()
    result["loadavg_after"] = _load()
    return result


def working_set(path: Path, threads: int) -> dict:
    """Memory alone, cheaply: load, drop the file pages, then pp512 and tg8 at --ctx 4096
    (and the logits are finite)."""
    import numpy as np

    from edge_steer import bench
    from edge_steer.engine import Context

    model = _load_as_commands_do(path)
    result = {"memory_after_load": _status(), "file_pages_dropped": _drop_file_pages(path)}
    with Context(model, n_ctx=CTX, n_batch=bench.BATCH, threads=threads) as ctx:
        ctx.ingest(model.tokenize(bench.PROMPT))
        result["logits_finite"] = bool(np.isfinite(ctx.logits()).all())
        ctx.forget(0)
        bench.engine_pp(ctx, None, bench.text_tokens(model, PP))
        bench.engine_tg(ctx, None, model.tokenize(bench.PROMPT), 8)
        result["memory_after_generation"] = _status()
    return result


# -- whole commands ------------------------------------------------------------------------------


def command(args: list[str], *, show: bool = False) -> dict:
    """Run one process; wall seconds, peak RSS (wait4) and the tail of its output (`show`:
    its stderr goes to ours instead)."""
    _say(" ".join(args[1:4]))
    load = _load()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdout=log, stderr=None if show else subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read().decode(errors="replace")[-600:]
    return {
        "args": " ".join(args[1:]),
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - start, 2),
        "peak_rss": usage.ru_maxrss * 1024,
        "loadavg_before": load,
        "tail": tail,
    }


def measure(key: str, out: Path, threads: int, reps: int, pairs: int, train_limit: int) -> dict:
    """Everything for one stand-in."""
    from edge_steer import catalog
    from edge_steer.doctor import model_fits

    spec = standins.SPECS[key]
    start = time.perf_counter()
    path = standins.write(spec, out)
    entry = catalog.lookup(spec.catalog)
    result: dict = {
        "standin": key,
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "catalog_bytes": entry.size,
        "write_or_reuse_s": round(time.perf_counter() - start, 1),
    }
    edge = [sys.executable, "-m", "edge_steer"]
    t = ["--threads", str(threads)]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "child.json"
        kid = [sys.executable, __file__, "--child", str(path), str(report), *t]
        run = command([*kid, "--reps", str(reps), "--pairs", str(pairs)], show=True)
        if run["rc"]:
            raise SystemExit(f"{key}: the measuring child failed:\n{run['tail']}")
        result["child"] = json.loads(report.read_text())
    result["child_peak_rss"] = run["peak_rss"]
    hi = ["generate", "--model", str(path), "-p", "Hi"]
    result["startup"] = command([*edge, *hi, "-n", "1", *t])
    concept = ["happy"]
    if spec.hp.n_expert:  # a new concept from persona words, as a user would train one
        concept = ["standin-cheer", "--positive", "cheerful,joyful", "--negative", "gloomy,sad"]
    result["train"] = command(
        [*edge, "train", *concept, "--model", str(path), "--limit", str(train_limit), *t]
    )
    name = concept[0]
    result["generate_steered"] = command(
        [*edge, *hi, "-n", "8", "--temp", "0", "--vector", f"{name}:1.0", *t]
    )
    if spec.hp.n_expert:
        with tempfile.TemporaryDirectory() as tmp:
            probes = Path(tmp) / "probes.jsonl"  # a new concept has no built-in probes
            probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
            cheap = ["--strengths", "-1,1", "--samples", "1", "--sample-tokens", "8", "--no-save"]
            result["eval"] = command(
                [*edge, "eval", name, "--model", str(path), "--probes", str(probes), *cheap, *t]
            )
    fits = model_fits([entry], available_ram=1 << 50, vram_free=0)[0]
    predicted = entry.ram_needed(CTX)
    raw = max(result["startup"]["peak_rss"], result["generate_steered"]["peak_rss"])
    working = result["child"]["memory_after_generation"]["VmHWM"]
    result["fit"] = {
        "predicted_ram": predicted,
        "doctor_needs": fits["needed"],
        "peak_rss_whole_command": raw,
        "peak_rss_working_set": working,
        "error_vs_working_set": round(predicted / working - 1, 4),
        "error_vs_whole_command": round(predicted / raw - 1, 4),
    }
    return result


def table(results: list[dict], threads: int) -> str:
    """The Markdown table of docs/benchmarks.md."""
    gb = 1e9
    rows = [
        "| stand-in | file | load | `generate -n 1` | peak RSS: command / working set | fit check "
        f"| pp{PP} | tg{TG} | capture / plain pp | train (pairs) | train peak RSS | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, f = r["child"], r["fit"]
        pp, tg = c[f"pp{PP}_tps"], c[f"tg{TG}_tps"]
        rows.append(
            f"| {r['standin']} | {r['file_bytes'] / gb:.2f} GB | {c['load_s']:.1f} s "
            f"| {r['startup']['wall_s']:.1f} s "
            f"| {f['peak_rss_whole_command'] / gb:.2f} / {f['peak_rss_working_set'] / gb:.2f} GB "
            f"| {f['predicted_ram'] / gb:.2f} GB ({f['error_vs_working_set']:+.1%}) "
            f"| {max(pp):.1f} tok/s | {max(tg):.2f} tok/s "
            f"| {c['capture']['capture_tps']:.1f} / {c['capture']['plain_pp_tps']:.1f} tok/s "
            f"| {r['train']['wall_s']:.0f} s ({r['train_pairs']}) "
            f"| {r['train']['peak_rss'] / gb:.2f} GB "
            f"| {c['loadavg_before']}-{c['loadavg_after']} |"
        )
    return "\n".join(rows) + f"\n\n{threads} threads."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="*", help=f"Stand-ins: {', '.join(standins.SPECS)}.")
    parser.add_argument("--child", type=Path, nargs=2, help=argparse.SUPPRESS)  # GGUF, JSON
    parser.add_argument("--working-set", type=Path, metavar="GGUF", help="Memory only.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16, help="Capture-speed pairs.")
    parser.add_argument("--train-limit", type=int, default=16)
    parser.add_argument("--out", type=Path, default=standins.DEFAULT_OUT)
    parser.add_argument("--json", type=Path, help="Write every figure here.")
    args = parser.parse_args(argv)
    if args.working_set:
        print(json.dumps(working_set(args.working_set, args.threads)))
        return 0
    if args.child:
        report = child(args.child[0], args.threads, args.reps, args.pairs)
        args.child[1].write_text(json.dumps(report))
        return 0
    unknown = sorted(set(args.model) - set(standins.SPECS))
    if unknown or not args.model:
        parser.error(f"name stand-ins from {', '.join(standins.SPECS)} (not {unknown})")
    results = []
    for key in args.model:
        try:
            result = measure(key, args.out, args.threads, args.reps, args.pairs, args.train_limit)
        except standins.NoRoom as e:
            print(f"skipped: {e}", file=sys.stderr)
            continue
        result["train_pairs"] = args.train_limit
        results.append(result)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        print(json.dumps(result, indent=1), flush=True)
    if results:
        print(table(results, args.threads))
    return 0 if results else standins.NO_ROOM


if __name__ == "__main__":
    sys.exit(main())
