"""Quality against the number of training pairs: how few pairs a vector needs.

Capture costs about one prompt's unshared tokens per pair, so at 7B the pair count sets most
of the first `--vector`'s wait. For each model, concept and pair count this trains a vector
with the defaults (calibration included) and measures its effect on the
concept's held-out probes and the neutral-text perplexity at -1 and +1, as `eval` does.

    python tools/pairs_curve.py --models demo,demo-chat --counts 32,64,96,128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_steer import dataset, evaluate, model_files, training, vectors  # noqa: E402
from edge_steer.engine import Model  # noqa: E402

SETTINGS = evaluate.EvalSettings(strengths=(-1.0, 1.0), samples=0)


def measure(model: Model, concept: str, count: int, threads: int | None) -> dict:
    """Train `concept` on the first `count` pairs; its effect and cost at -1 and +1."""
    start = time.perf_counter()
    pairs = dataset.contrast_pairs(dataset.load_builtin(concept), model, limit=count)
    vector = training.train(model, pairs, training.TrainOptions(threads=threads), name=concept)
    seconds = time.perf_counter() - start
    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    probes = dataset.load_builtin(concept).probes
    with evaluate.context(model, threads) as ctx:
        result = evaluate.sweep(ctx, rows, (1, model.n_layer - 1), probes, SETTINGS)
    minus, plus = result.nearest(-1.0), result.nearest(1.0)
    assert minus is not None and plus is not None
    return {
        "concept": concept,
        "pairs": count,
        "train_s": round(seconds, 1),
        "chosen": f"{vector.metadata['method']}:{vector.layers[0]}-{vector.layers[-1]}",
        "effect": [round(result.effect(p), 2) for p in (minus, plus)],
        "ppl_ratio": [round(result.ppl_ratio(p), 3) for p in (minus, plus)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,demo-chat")
    parser.add_argument("--concepts", default="all")
    parser.add_argument("--counts", default="32,64,128")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    names = dataset.builtin_names() if args.concepts == "all" else args.concepts.split(",")
    rows = []
    for name in args.models.split(","):
        with Model(model_files.resolve_model(name)) as model:
            for concept in names:
                for count in map(int, args.counts.split(",")):
                    row = {"model": name, **measure(model, concept, count, args.threads)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
