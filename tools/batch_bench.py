"""Continuous batching, side by side: llama.cpp's own `llama-server` (built from the vendored
llama.cpp of the installed llama-cpp-python, `-np LANES`, no steering) and `edge-steer serve
--parallel LANES` with a different steering for each client (and with `--shared-steering`
one steering for all), on one model, with the same
threads, prompts and token counts, at 1, LANES and 2 x LANES concurrent clients. Optionally
a third server: edge-steer from another source tree (`--baseline DIR`, e.g. a checkout of
the release before batching). Greedy completions over HTTP from the standard library (a
heavy client would take the server's CPU on a small machine), bounded in count and time,
127.0.0.1 only. All servers run at once and the rounds alternate between them (a shared
machine's speed drifts); reports the median round's total tokens/s and p50/p95 latency,
and ratios. Each answer is also checked against the same request's answer alone.

    python tools/batch_bench.py --model demo --threads 2 --baseline /tmp/before
    python tools/batch_bench.py --model STANDIN.gguf --tokens 16 --per-client 1 --rounds 1 \
        --ctx 512 --vector bench-random --random-vector --output batch_bench_mistral_standin.json
    python tools/batch_bench.py --model STANDIN.gguf --gpu-layers all --threads 8 --tokens 64 \
        --vector bench-random --random-vector --shared-steering --baseline /tmp/before \
        --output batch_bench_gpu_h200.json      # a CUDA build of llama-cpp-python
    python tools/batch_bench.py --model demo --threads 2 --shared-steering --repack \
        --output batch_bench_repack.json      # edge-steer with llama-server's weight layouts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.parity import build
from tools.server_process import server_process

PROMPTS = [
    "The best thing about mornings is",
    "My plan for the weekend:",
    "Dear diary, today",
    "Once upon a time in a small village,",
]
STRENGTHS = (0.0, 1.0, -1.0, 0.5)  # of --vector, one per client: four different steerings
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = "edge-steer, one steering"


# how an edge-steer server steers its clients: (vector, strengths), client k taking strength
# k % len(strengths); None for llama-server (it serves the model as `bench`, as edge-steer does)
Steer = tuple[str, tuple[float, ...]] | None


def complete(url: str, number: int, tokens: int, steer: Steer) -> tuple[int, float, str]:
    """One greedy completion; (completion tokens, seconds, text). Request `number` gets
    prompt `number % 4` and the strength of client `number`."""
    body: dict = {"prompt": PROMPTS[number % len(PROMPTS)], "max_tokens": tokens}
    body |= {"temperature": 0, "cache_prompt": False, "model": "bench"}
    if steer:
        vector, strengths = steer
        body["steering"] = {vector: strengths[number % len(strengths)]}
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as response:
        answer = json.load(response)
    seconds = time.perf_counter() - start
    return answer["usage"]["completion_tokens"], seconds, answer["choices"][0]["text"]


def answers_alone(url: str, tokens: int, steer: Steer) -> list[str]:
    """Each (prompt, steering) combination's answer with nothing else in the batch."""
    return [complete(url, number, tokens, steer)[2] for number in range(len(PROMPTS))]


def load(
    url: str, clients: int, per_client: int, tokens: int, steer: Steer, alone: list[str]
) -> dict:
    """`clients` threads, each sending `per_client` requests one after another; counts the
    answers that differ from the same request's answer alone (`alone`)."""
    complete(url, 0, 4, steer)  # warm: graphs reserved, pages touched

    def client(c: int) -> list[tuple[int, tuple[int, float, str]]]:
        numbers = [c + k * clients for k in range(per_client)]
        return [(n, complete(url, n, tokens, steer)) for n in numbers]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = [run for done in pool.map(client, range(clients)) for run in done]
    wall = time.perf_counter() - start
    latencies = sorted(seconds for _, (_, seconds, _) in runs)
    return {
        "requests": len(runs),
        "tokens_per_s": round(sum(count for _, (count, _, _) in runs) / wall, 2),
        "p50_s": round(statistics.median(latencies), 2),
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 2),
        "differ_from_alone": sum(text != alone[n % len(alone)] for n, (_, _, text) in runs),
    }


def store_random_vector(model: Path, name: str) -> None:
    """A random direction in the middle blocks, stored as `name` for `model`."""
    import numpy as np

    from edge_steer import model_files, store, vectors

    shape = model_files.model_shape(model)
    rng = np.random.default_rng(0)
    directions = {
        b: rng.standard_normal(shape.n_embd).astype(np.float32)
        for b in range(shape.n_layer // 3, 2 * shape.n_layer // 3)
    }
    vector = vectors.ControlVector(directions, shape.architecture, {"concept": name})
    vectors.write(vector, store.model_vectors_dir(model) / f"{name}.gguf")


def median_row(runs: list[dict]) -> dict:
    """The round with the median total tokens/s (its latencies with it), and every round's."""
    ordered = sorted(runs, key=lambda row: row["tokens_per_s"])
    return ordered[len(ordered) // 2] | {"rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def servers(args: argparse.Namespace, model: Path) -> dict[str, tuple[list[str], list[str], dict]]:
    """name -> (program, arguments, environment)."""
    threads, lanes, ctx = str(args.threads), str(args.lanes), str(args.ctx)
    binary = build(args.cache, "llama-server")
    llama_args = ["-m", str(model), "-np", lanes, "-c", str(args.ctx * args.lanes)]
    llama_args += ["-t", threads, "-tb", threads, "--host", "127.0.0.1", "--alias", "bench"]
    llama_args += ["-ngl", "999" if args.gpu_layers == "all" else args.gpu_layers]
    ours = ["--model", str(model), "--parallel", lanes, "--ctx", ctx, "--threads", threads]
    ours += ["--gpu-layers", args.gpu_layers] + (["--repack"] if args.repack else [])
    ours += ["--preset", f"bench={args.vector}:0"]  # the model as `bench`, as llama-server's
    found = {
        "llama-server": ([str(binary)], llama_args, dict(os.environ)),
        "edge-steer": ([sys.executable, "-m", "edge_steer", "serve"], ours, dict(os.environ)),
    }
    if args.baseline:
        path = [str(args.baseline), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))  # its edge_steer first
        found["edge-steer before"] = (found["edge-steer"][0], found["edge-steer"][1], env)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lanes", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per lane")
    parser.add_argument("--tokens", type=int, default=48, help="completion tokens per request")
    parser.add_argument("--per-client", type=int, default=3, help="requests per client")
    parser.add_argument("--baseline", type=Path, help="an older edge-steer source tree")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/edge-steer/parity")
    parser.add_argument("--only", help="comma list of servers to run (default: all)")
    parser.add_argument("--output", default="batch_bench.json", help="file in tools/results")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per level")
    parser.add_argument("--vector", default="happy", help="a stored vector of the model")
    parser.add_argument("--gpu-layers", default="0", help="layers on the GPU: N or all")
    parser.add_argument(
        "--shared-steering",
        action="store_true",
        help=f"also edge-steer with every client under one steering (row '{SHARED}')",
    )
    parser.add_argument(
        "--random-vector", action="store_true", help="store a random one as --vector first"
    )
    parser.add_argument(
        "--repack",
        action="store_true",
        help="edge-steer servers with --repack (llama-server's layouts, replies not as alone)",
    )
    args = parser.parse_args()
    from edge_steer import model_files

    model = model_files.resolve_model(args.model)
    if args.random_vector:  # stand-ins have no trained vectors; speed is what is measured
        store_random_vector(model, args.vector)
    report: dict = {"model": model.name, "settings": vars(args) | {"cache": None}, "rows": {}}
    report["settings"]["baseline"] = str(args.baseline) if args.baseline else None
    chosen = {
        name: spec
        for name, spec in servers(args, model).items()
        if not args.only or name in args.only.split(",")
    }
    with contextlib.ExitStack() as stack:  # all up at once: rounds alternate between them
        urls = {
            name: stack.enter_context(server_process(a, env=env, program=program)).url
            for name, (program, a, env) in chosen.items()
        }
        steer: dict[str, Steer] = {
            name: None if name == "llama-server" else (args.vector, STRENGTHS) for name in urls
        }
        if args.shared_steering and "edge-steer" in urls:  # every client the same: native
            urls[SHARED] = urls["edge-steer"]
            steer[SHARED] = (args.vector, (1.0,))
        alone = {name: answers_alone(url, args.tokens, steer[name]) for name, url in urls.items()}
        for clients in (1, args.lanes, 2 * args.lanes):
            runs: dict[str, list[dict]] = {name: [] for name in urls}
            for _ in range(args.rounds):  # the machine's speed drifts: interleave, take medians
                for name, url in urls.items():
                    level = (clients, args.per_client, args.tokens)
                    runs[name].append(load(url, *level, steer[name], alone[name]))
            for name, found in runs.items():
                row = median_row(found)
                report["rows"].setdefault(str(clients), {})[name] = row
                print(f"{name}, {clients} client(s): {row}", flush=True)
    if args.only:  # a partial run: print, keep the full results file as it is
        print(json.dumps(report["rows"], indent=2))
        return
    report["ratios"] = ratios(report["rows"], args.lanes)
    print(json.dumps(report["ratios"], indent=2))
    (RESULTS / args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / args.output}")


def ratios(rows: dict, lanes: int) -> dict:
    """edge-steer's total tokens/s over llama-server's and over the baseline's."""
    out = {}
    for clients, row in rows.items():
        mine = row["edge-steer"]["tokens_per_s"]
        out[f"{clients} clients: edge-steer / llama-server"] = round(
            mine / row["llama-server"]["tokens_per_s"], 3
        )
        if "edge-steer before" in row:
            out[f"{clients} clients: edge-steer / before"] = round(
                mine / row["edge-steer before"]["tokens_per_s"], 3
            )
        if SHARED in row:
            out[f"{clients} clients: {SHARED} / llama-server"] = round(
                row[SHARED]["tokens_per_s"] / row["llama-server"]["tokens_per_s"], 3
            )
    return out


if __name__ == "__main__":
    main()
