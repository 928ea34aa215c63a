"""Which blocks and method steer best? Train each concept once per span of depth and method
(from one hidden-state capture), calibrate each, and measure held-out effect at -1 and +1.

The evidence behind training.DEFAULT_SPAN and DEFAULT_METHOD (docs/training.md "Blocks and
method"): at equal fluency cost, which span and method move the held-out probes furthest.

    python tools/span_sweep.py --model demo-chat --concepts honest,lazy --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_steer import dataset, evaluate, model_files, training, vectors
from edge_steer.engine import Model

SPANS = "0.1-0.85,0.3-0.65,0.5-0.85"  # fractions of depth: today's default, then the old two


def parse_spans(text: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in (part.split("-") for part in text.split(","))]


def sweep_concept(model: Model, name: str, args: argparse.Namespace) -> list[dict]:
    pairs = dataset.contrast_pairs(dataset.load_builtin(name), model, limit=args.pairs)
    spans = [training.span_blocks(model.n_layer, s) for s in parse_spans(args.spans)]
    deepest = training.TrainOptions(threads=args.threads, layers=(1, max(b for _, b in spans)))
    states = training.hidden_states(model, [p for pair in pairs for p in pair], deepest)
    pos, neg = states[0::2], states[1::2]
    settings = evaluate.EvalSettings(strengths=(-1.0, 0.0, 1.0), samples=args.samples)
    probes = dataset.load_builtin(name).probes
    rows_out = []
    for method in args.methods.split(","):
        for layers in spans:
            options = replace(deepest, method=method, layers=layers)
            vector = training.finish(model, pos, neg, options, name=name)
            rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
            with evaluate.context(model, args.threads) as ctx:
                result = evaluate.sweep(ctx, rows, layers, probes, settings)
            low, high = result.nearest(-1.0), result.nearest(1.0)
            assert low and high
            row = {
                "concept": name,
                "method": method,
                "blocks": list(layers),
                "effect": [round(result.effect(low), 2), round(result.effect(high), 2)],
                "ppl": [round(result.ppl_ratio(low), 3), round(result.ppl_ratio(high), 3)],
                "degenerate": [low.degenerate, high.degenerate, result.reference.degenerate],
                "calibration_scale": vector.metadata.get("calibration_scale"),
            }
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--concepts", default=",".join(dataset.builtin_names()))
    parser.add_argument("--spans", default=SPANS, help="fractions of depth, FROM-TO,...")
    parser.add_argument("--methods", default="mean-diff,pca-diff")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--samples", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    with Model(model_files.resolve_model(args.model)) as model:
        for name in args.concepts.split(","):
            results += sweep_concept(model, name, args)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
