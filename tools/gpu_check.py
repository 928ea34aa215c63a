"""GPU check: every --moe-offload split against the all-CPU run, with tokens/s.

For each model and each split (`--gpu-layers all` with `--moe-offload none|all|N|auto`, and
all on the CPU), load the model, steer it with a fixed random vector, and compare with the
all-CPU run: the hidden states captured at every block (max relative difference), the shift
the vector causes at its block (must equal the vector), and the greedy continuation. Then
time prompt processing and generation. Prints a table, writes JSON.

    python tools/gpu_check.py --models demo,tiny-moe [--json out.json]

GPU kernels sum in other orders than the CPU ones, so "matches" means within a small
relative tolerance, and the greedy texts are reported rather than required to be equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_steer import files, gguffile, machine, model_files, offload
from edge_steer.engine import Context, Model, Sampler, SamplerSettings, hidden
from tools.tiny_models import write_tiny_model

PROMPT = "The old lighthouse keeper looked out over the stormy sea and said"


def model_path(name: str, workdir: Path) -> Path:
    if name == "tiny-moe":
        return write_tiny_model(workdir / "tiny-mixtral.gguf", moe=True, n_layer=8)
    if name == "tiny-dense":
        return write_tiny_model(workdir / "tiny-mistral.gguf", n_layer=8)
    return model_files.resolve_model(name)


def steering_rows(model: Model, block: int) -> np.ndarray:
    """One random direction at `block`, about a tenth of that block's typical state norm."""
    rows = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
    rows[block] = np.random.default_rng(0).normal(size=model.n_embd).astype(np.float32)
    return rows


def measure(path: Path, gpu: str, moe: str, block: int, threads: int) -> dict:
    plan = offload.plan_model(path, gpu, moe, 2048)
    model = Model(path, gpu_layers=plan.gpu_layers, cpu_tensors=plan.cpu_tensors, mmap=plan.mmap)
    tokens = model.tokenize(PROMPT)
    with Context(model, n_ctx=2048, threads=threads, capture=True) as ctx:
        (bare,) = hidden.capture(ctx, [tokens])
        rows = steering_rows(model, block)
        rows[block] *= 0.1 * float(np.linalg.norm(bare[0, block]))
        ctx.set_steering(rows)
        (steered,) = hidden.capture(ctx, [tokens])
    with Context(model, n_ctx=2048, threads=threads) as ctx:
        ctx.set_steering(rows)
        greedy = Sampler(model, SamplerSettings(temperature=0.0, repeat_penalty=1.0))
        start = time.perf_counter()
        pieces = ctx.generate(tokens, greedy, max_tokens=128)
        text = "".join(pieces)
        seconds = time.perf_counter() - start
        stats = pieces.stats
        pp = pp_speed(ctx, model)
    result = {
        "model": path.name,
        "gpu_layers": gpu,
        "moe_offload": moe,
        "n_gpu_layers": plan.gpu_layers,
        "moe_layers": plan.moe_layers,
        "overridden": len(model.overridden),
        "buffers": {k: files.size_text(v) for k, v in model.buffers.items()},
        "bare": bare,
        "steered": steered,
        "shift_error": float(
            np.abs(steered[0, block] - bare[0, block] - rows[block]).max()
            / np.abs(rows[block]).max()
        ),
        "text": text,
        "tg_tps": stats.generated / stats.seconds if stats.seconds else float("nan"),
        "wall_s": seconds,
        "pp_tps": pp,
    }
    model.close()
    return result


def pp_speed(ctx: Context, model: Model, n: int = 512, reps: int = 3) -> float:
    """Prompt processing tokens/s over `reps` fresh 512-token prompts."""
    tokens = (model.tokenize(PROMPT * 40))[:n]
    best = []
    for _ in range(reps):
        ctx.forget()
        start = time.perf_counter()
        ctx.ingest(tokens)
        best.append(len(tokens) / (time.perf_counter() - start))
    return float(np.median(best))


def relative(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-block difference, relative to that block's state norm."""
    diff = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-6)
    return float(diff.max())


def check(name: str, workdir: Path, threads: int) -> list[dict]:
    path = model_path(name, workdir)
    weights = offload.read_weights(gguffile.read_header(path))
    block = max(1, weights.n_layer // 2)
    splits = [("0", "none"), ("all", "none")]
    if weights.is_moe:
        splits += [("all", "all"), ("all", str(weights.n_layer // 2)), ("all", "auto")]
    rows = [measure(path, gpu, moe, block, threads) for gpu, moe in splits]
    cpu = rows[0]
    for row in rows:
        row["states_vs_cpu"] = relative(row["bare"], cpu["bare"])
        row["steered_vs_cpu"] = relative(row["steered"], cpu["steered"])
        row["same_text_as_cpu"] = row["text"] == cpu["text"]
    for row in rows:
        del row["bare"], row["steered"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-moe,demo")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print("devices:", [(d.name, d.kind, files.size_text(d.total)) for d in machine.devices()])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for name in args.models.split(",") for r in check(name, Path(tmp), args.threads)]
    cols = (
        "model",
        "gpu_layers",
        "moe_offload",
        "moe_layers",
        "overridden",
        "states_vs_cpu",
        "steered_vs_cpu",
        "shift_error",
        "same_text_as_cpu",
        "pp_tps",
        "tg_tps",
    )
    print(" | ".join(cols))
    for row in rows:
        print(
            " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols)
        )
        print("    buffers:", row["buffers"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
