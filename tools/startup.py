"""Whole-command start-up, as a user lives it: wall time of real processes, median of N runs.

    python tools/startup.py [--runs 5] [--model demo]

Compares `edge-steer generate --model M -p Hello -n 1` with the floor any Python front end
can reach: a minimal script that loads the same GGUF through llama-cpp-python's low-level API
with default parameters and decodes the prompt for one token. Also times `--help`,
`--version`, `models list` and `vectors list`.
Prints a Markdown table (docs/benchmarks.md, Start-up) and exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 1.5  # generate / minimal script
TARGET_HELP_S = 0.3

BARE = """
import sys, llama_cpp as ll
ll.llama_backend_init()
model = ll.llama_model_load_from_file(sys.argv[1].encode(), ll.llama_model_default_params())
ctx = ll.llama_init_from_model(model, ll.llama_context_default_params())
vocab = ll.llama_model_get_vocab(model)
tokens = (ll.llama_token * 16)()
n = ll.llama_tokenize(vocab, b"Hello", 5, tokens, 16, True, False)
assert ll.llama_decode(ctx, ll.llama_batch_get_one(tokens, n)) == 0
print(ll.llama_sampler_sample(ll.llama_sampler_init_greedy(), ctx, -1))
"""  # default parameters throughout, as anyone's first llama-cpp-python script


def wall(command: list[str], runs: int, env: dict[str, str]) -> float:
    """Median wall seconds of `command` over `runs` runs, after one warm-up (page cache)."""
    times = []
    for i in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: imports from cached .pyc
        env.setdefault("EDGE_STEER_HOME", home)
        cli = [sys.executable, "-m", "edge_steer"]
        path = subprocess.run(
            [*cli, "pull", args.model], check=True, capture_output=True, text=True, env=env
        ).stdout.strip()
        generate = wall(
            [*cli, "generate", "-m", args.model, "-p", "Hello", "-n", "1"], args.runs, env
        )
        bare = wall([sys.executable, "-c", BARE, path], args.runs, env)
        rows = [("generate -p Hello -n 1", generate), ("minimal llama-cpp-python script", bare)]
        for name, extra in (
            ("--help", ["--help"]),
            ("--version", ["--version"]),
            ("models list", ["models", "list"]),
            ("vectors list", ["vectors", "list"]),
        ):
            rows.append((name, wall([*cli, *extra], args.runs, env)))
    ratio = generate / bare
    print(f"| command ({Path(path).name}, median of {args.runs}) | wall s |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| `{name}` | {seconds:.3f} |")
    print(f"\ngenerate / minimal script: {ratio:.2f} (target <= {TARGET_RATIO})")
    help_s = dict(rows)["--help"]
    ok = ratio <= TARGET_RATIO and help_s <= TARGET_HELP_S
    print(f"--help: {help_s:.3f} s (target <= {TARGET_HELP_S} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
