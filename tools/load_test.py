"""Load test of `edge-steer serve` on 127.0.0.1, bounded in count and time.

For each --parallel value: start a real server, ask it for each (prompt, steering)
combination alone, one after another, then send REQUESTS greedy completions from CLIENTS
concurrent `openai` clients and check every answer against its combination's answer alone:
lanes decode together, so a lane that mixed up steering or prompts, or a row that rounded
differently beside others, shows as a mismatch. With one lane the answers alone must also
equal the library's (the CLI's) tokens. Reports failures, mismatches, p50/p95
latency and total tokens/s; then the same long generation through HTTP (--parallel 1, stream)
against `edge-steer generate` (the CLI engine), as tokens/s of the generation phase.

    python tools/load_test.py --model demo --requests 200 --clients 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.server_process import running_server

PROMPTS = [
    "The best thing about mornings is",
    "My plan for the weekend:",
    "Dear diary, today",
]
STEERINGS = [{}, {"happy": 1.0}, {"happy": -1.0}, {"happy": 2.0}]
RESULTS = Path(__file__).resolve().parent / "results" / "load_test.json"


def expected_texts(model: str, max_tokens: int) -> dict[tuple[int, int], str]:
    """Each combination's greedy text from the library, each from an empty cache."""
    import edge_steer

    texts = {}
    with edge_steer.load(model) as steered:
        for j, steering in enumerate(STEERINGS):
            for name in list(steered.steering.strengths()):
                steered.set_vector(name, 0)
            for name, strength in steering.items():
                steered.set_vector(name, strength)
            for i, prompt in enumerate(PROMPTS):
                steered.context.forget(0)  # each prompt in one pass, as `cache_prompt: false`
                texts[i, j] = steered.generate(prompt, max_tokens=max_tokens, temperature=0)
    return texts


def alone_texts(url: str, model_id: str, max_tokens: int) -> dict[tuple[int, int], str]:
    """Each combination's greedy text from the server, one request at a time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    combos = len(PROMPTS) * len(STEERINGS)
    return {
        r["combo"]: r["text"]
        for r in (one_request(client, model_id, n, max_tokens) for n in range(combos))
    }


def one_request(client, model_id: str, number: int, max_tokens: int) -> dict:
    i, j = number % len(PROMPTS), (number // len(PROMPTS)) % len(STEERINGS)
    start = time.perf_counter()
    try:
        reply = client.completions.create(
            model=model_id,
            prompt=PROMPTS[i],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"steering": STEERINGS[j], "cache_prompt": False},
        )
    except openai.OpenAIError as exc:
        return {"combo": (i, j), "error": str(exc), "seconds": time.perf_counter() - start}
    return {
        "combo": (i, j),
        "text": reply.choices[0].text,
        "tokens": reply.usage.completion_tokens,
        "seconds": time.perf_counter() - start,
    }


def run_load(url: str, model_id: str, requests: int, clients: int, max_tokens: int):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(
            pool.map(lambda n: one_request(client, model_id, n, max_tokens), range(requests))
        )
    return results, time.perf_counter() - start


def summarise(results: list[dict], wall: float, expected: dict) -> dict:
    ok = [r for r in results if "error" not in r]
    latencies = sorted(r["seconds"] for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "mixed_up": sum(r["text"] != expected[r["combo"]] for r in ok),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "wall_s": round(wall, 1),
    }


def http_generation_speed(url: str, model_id: str, prompt: str, n: int) -> float:
    """Tokens/s between the first and the last streamed token of one greedy request, read
    with the standard library: on 2 cores a heavy client would take CPU from the server."""
    body = {"model": model_id, "prompt": prompt, "max_tokens": n, "temperature": 0}
    body |= {"stream": True, "cache_prompt": False}
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    stamps = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def cli_generation_speed(model: str, prompt: str, n: int) -> float:
    command = ["edge-steer", "generate", "--model", model, "-p", prompt, "-n", str(n)]
    done = subprocess.run([*command, "--temp", "0", "--json"], capture_output=True, check=True)
    return json.loads(done.stdout)["tokens_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--parallel", default="1,2,4")
    parser.add_argument("--speed-tokens", type=int, default=128)
    args = parser.parse_args()
    library = expected_texts(args.model, args.max_tokens)
    report: dict = {"model": args.model, "clients": args.clients, "rows": {}}
    preset = ["--preset", "warm=happy:1"]  # trains `happy` first, if the store lacks it
    for parallel in map(int, args.parallel.split(",")):
        with running_server(["--model", args.model, "--parallel", str(parallel), *preset]) as url:
            expected = alone_texts(url, args.model, args.max_tokens)
            if parallel == 1:
                report["one_lane_equals_library"] = expected == library
            results, wall = run_load(url, args.model, args.requests, args.clients, args.max_tokens)
            report["rows"][parallel] = row = summarise(results, wall, expected)
            print(f"--parallel {parallel}: {row}", flush=True)
            if parallel == 1:
                speeds = []
                for _ in range(3):  # alternate, so both see the same machine
                    http = http_generation_speed(url, args.model, PROMPTS[0], args.speed_tokens)
                    cli = cli_generation_speed(args.model, PROMPTS[0], args.speed_tokens)
                    speeds.append((http, cli))
                http, cli = (statistics.median(s) for s in zip(*speeds, strict=True))
                report["http_vs_cli"] = {
                    "http_tok_s": round(http, 1),
                    "cli_tok_s": round(cli, 1),
                    "ratio": round(http / cli, 3),
                }
                print(f"generation through HTTP vs CLI: {report['http_vs_cli']}", flush=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
