"""Training benchmark: wall time, capture vs plain prompt-processing tokens/s, peak RSS.

Capture reads every block's output through llama.cpp's eval callback; the target is that it
costs little over decoding the same prompts without it (ratio >= 0.8). Both are timed in one
process on the same prompts, batched the same way.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_steer import dataset, hub, library, train
from edge_steer.engine import Context, Model
from tools.tiny_models import write_tiny_model


def plain_seconds(model: Model, prompts: list[str], options: train.TrainOptions) -> float:
    """Decode the same prompts, 64 sequences a batch, with no eval callback."""
    tokens = [model.tokenize(p, parse_special=True) for p in prompts]
    batch = max(options.batch, max(map(len, tokens)))
    with Context(model, n_ctx=batch, n_batch=batch, n_seq=64, threads=options.threads) as ctx:
        start = time.perf_counter()
        for group in ctx._groups(tokens):  # same packing as capture
            ctx.forget(0)
            ctx.batch.clear()
            for seq_id, index in enumerate(group):
                for pos, token in enumerate(tokens[index]):
                    ctx.batch.add(token, pos, seq_id, pos == len(tokens[index]) - 1)
            ctx._decode()
        return time.perf_counter() - start


def bench(model: Model, concept: str, options: train.TrainOptions) -> dict:
    pairs = library.contrast_pairs(model, concept)
    prompts = [p for pair in pairs for p in pair]
    n_tokens = sum(len(model.tokenize(p, parse_special=True)) for p in prompts)
    start = time.perf_counter()
    train.train(model, pairs, options, name=concept)
    wall = time.perf_counter() - start
    plain = plain_seconds(model, prompts, options)
    return {
        "concept": concept,
        "pairs": len(pairs),
        "tokens": n_tokens,
        "train_s": wall,
        "capture_tps": n_tokens / wall,
        "plain_tps": n_tokens / plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--concepts", default=",".join(dataset.builtin_names()))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    options = train.TrainOptions(threads=args.threads)
    runs = [(Model(hub.resolve_model(args.model)), args.concepts.split(","))]
    tiny = write_tiny_model(Path("/tmp/edge-steer-bench/tiny-mixtral.gguf"), moe=True)
    runs.append((Model(tiny), ["lazy"]))
    for model, concepts in runs:
        for concept in concepts:
            r = bench(model, concept, options)
            print(
                f"{model.name:>18} {r['concept']:>10}: {r['pairs']} pairs, {r['tokens']} tokens, "
                f"train {r['train_s']:.1f}s, capture {r['capture_tps']:.0f} tok/s vs plain "
                f"{r['plain_tps']:.0f} tok/s = {r['capture_tps'] / r['plain_tps']:.2f}"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
