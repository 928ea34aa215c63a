"""Speed over RPC on loopback: pp512 and tg128 with 0, 1 and 2 workers, as ratios to local.

    python tools/rpc_bench.py [--model demo] [--reps 3] [--threads 1]

Starts `edge-steer worker`s on free loopback ports, loads the model with every layer on them
(`--gpu-layers all --rpc ...`), and times prompt processing and greedy generation with
engine.bare_decode (the shortest llama_decode loop). Also the load time, and the bytes the
client's sockets sent and received per generated token (read with `ss -tin`). Writes
tools/results/rpc_loopback.json and prints a Markdown table for docs/moe-and-rpc.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_rpc import free_port, start_worker, stop  # noqa: E402

from edge_steer import bench, model_files, runtime  # noqa: E402
from edge_steer.engine import Context, Model, bare_decode  # noqa: E402


def socket_bytes(ports: list[int]) -> int:
    """Bytes sent plus received on this machine's TCP connections to `ports`."""
    total = 0
    for port in ports:
        text = subprocess.run(
            ["ss", "-tinH", "state", "established", "(", "dport", "=", f":{port}", ")"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        total += sum(int(n) for n in re.findall(r"bytes_(?:sent|received):(\d+)", text))
    return total


def measure(model: Model, args, ports: list[int]) -> dict:
    prompt = bench.text_tokens(model, args.pp)
    with Context(model, n_ctx=args.pp + args.tg + 16, threads=args.threads) as ctx:
        bare_decode(ctx, prompt[:16], 4)  # warm-up: graphs reserved, buffers touched
        pp, tg, moved = [], [], []
        for _ in range(args.reps):
            pp_s, _, _ = bare_decode(ctx, prompt, 0)
            before = socket_bytes(ports)
            _, _, tg_s = bare_decode(ctx, prompt[:1], args.tg)
            moved.append((socket_bytes(ports) - before) / args.tg)
            pp.append(args.pp / pp_s)
            tg.append(args.tg / tg_s)
    return {
        "pp_tps": statistics.median(pp),
        "tg_tps": statistics.median(tg),
        "bytes_per_token": statistics.median(moved) if ports else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    args = parser.parse_args()
    path = model_files.resolve_model(args.model)
    ports = [free_port(), free_port()]
    logs = Path(tempfile.mkdtemp())
    workers = [start_worker(p, logs / f"{p}.log") for p in ports]
    rows = []
    try:
        for label, used, repack in (
            ("local", [], True),
            ("local, no repack", [], False),
            ("1 worker", ports[:1], True),
            ("2 workers", ports, True),
        ):
            start = time.perf_counter()
            if used:
                model = runtime.load_model(
                    path, gpu_layers="all", rpc=",".join(f"127.0.0.1:{p}" for p in used)
                )
            else:
                model = Model(path, repack=repack)
            load_s = time.perf_counter() - start
            with model:
                rows.append({"setup": label, "load_s": load_s, **measure(model, args, used)})
            print(rows[-1], file=sys.stderr)
    finally:
        for worker in workers:
            stop(worker)
    base = rows[0]
    for row in rows:
        row["pp_ratio"] = row["pp_tps"] / base["pp_tps"]
        row["tg_ratio"] = row["tg_tps"] / base["tg_tps"]
    result = {"model": path.name, "threads": args.threads, "reps": args.reps, "rows": rows}
    (ROOT / "tools" / "results" / "rpc_loopback.json").write_text(json.dumps(result, indent=1))
    print(f"| setup | load s | pp{args.pp} t/s | ratio | tg{args.tg} t/s | ratio | bytes/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setup']} | {r['load_s']:.2f} | {r['pp_tps']:.1f} | {r['pp_ratio']:.2f} | "
            f"{r['tg_tps']:.1f} | {r['tg_ratio']:.2f} | {r['bytes_per_token'] / 1024:.1f} KiB |"
        )


if __name__ == "__main__":
    main()
