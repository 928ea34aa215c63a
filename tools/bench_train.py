"""Time `edge-steer train` as a user lives it, and where its time goes.

Runs the whole command (wall time and peak RSS of the process, default settings) on a model,
then the same training in-process with a timer around each stage: capture (hidden states
of every contrast prompt) and calibration.
`--before REF` also runs the whole command from another commit of this repository (a
temporary git worktree), so that before and after are measured in one run, on one machine.

    python tools/standins.py mistral-q4_k_m
    python tools/bench_train.py ~/.cache/edge-steer-standins/mistral-q4_k_m.standin-v1.gguf \\
        --concept happy --threads 2 [--before REF] [--json out.json]
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


def whole_command(model: Path, concept: str, threads: int, source: Path) -> dict:
    """`python -m edge_steer train CONCEPT` from `source` (a checkout), in a fresh store."""
    with tempfile.TemporaryDirectory() as home:
        env = os.environ | {"EDGE_STEER_HOME": home, "PYTHONPATH": str(source)}
        command = [sys.executable, "-m", "edge_steer", "train", concept, "--model", str(model)]
        command += ["--threads", str(threads)]
        with tempfile.TemporaryFile("w+") as log:
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=log, stderr=log, env=env, cwd=home)
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS
            wall = time.perf_counter() - start
            process.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            output = log.read()
    if process.returncode != 0:
        raise SystemExit(f"train failed: {output[-2000:]}")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
        "report": [line for line in output.splitlines() if "trained in" in line],
    }


def stages(model_path: Path, concept: str, threads: int) -> dict:
    """The same training in-process, timed stage by stage."""
    from edge_steer import dataset, library, training
    from edge_steer.engine import Model

    with Model(model_path) as model:
        pairs = library.contrast_pairs(model, concept)
        options = training.TrainOptions(threads=threads)
        prompts = [p for pair in pairs for p in pair]
        tokens = sum(len(model.tokenize(p, parse_special=True)) for p in prompts)
        start = time.perf_counter()
        states = training.hidden_states(model, prompts, options)
        captured = time.perf_counter()
        vector = training.from_states(model, states[0::2], states[1::2], options, name=concept)
        calibrated = training.calibrated(model, vector, options)
        end = time.perf_counter()
    return {
        "pairs": len(pairs),
        "prompt_tokens": tokens,
        "persona_pairs": len(dataset.persona_prefixes(dataset.load_builtin(concept), model)),
        "capture_s": round(captured - start, 1),
        "calibration_s": round(end - captured, 1),
        "calibration_points": calibrated.metadata.get("calibration_points"),
    }


def worktree(ref: str, folder: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), ref],
        check=True,
        capture_output=True,
    )
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--concept", default="happy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--before", help="a git ref to run the whole command from as well")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict = {"model": args.model.name, "concept": args.concept, "threads": args.threads}
    result["after"] = whole_command(args.model, args.concept, args.threads, ROOT)
    print(f"after: {result['after']}", flush=True)
    result["stages"] = stages(args.model, args.concept, args.threads)
    print(f"stages: {result['stages']}", flush=True)
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            tree = worktree(args.before, Path(tmp) / "before")
            try:
                result["before"] = whole_command(args.model, args.concept, args.threads, tree)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tree])
        result["before"]["ref"] = args.before
        print(f"before: {result['before']}", flush=True)
        result["speedup"] = round(result["before"]["wall_s"] / result["after"]["wall_s"], 2)
    result["load_average"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
