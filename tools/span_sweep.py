"""Which blocks and method steer best? Train every candidate of `choose.py` for each concept
(from one hidden-state capture), calibrate it, and measure held-out effect at -1 and +1.

The evidence behind choose.py's rule: per concept, each candidate's held-in effect and
estimated budget scale (what choose.py judges by), next to what eval measures on held-out
probes at the calibrated scale.

    python tools/span_sweep.py --model demo --concepts honest,lazy --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_steer import choose, dataset, evaluate, model_files, training, vectors
from edge_steer.engine import Model


def _candidate(text: str) -> choose.Candidate:
    """A candidate back from its `describe()` text (method:first-last:xscale:share)."""
    method, blocks, scale, share = text.split(":")
    first, last = (int(n) for n in blocks.split("-"))
    return choose.Candidate(method, (first, last), float(scale[1:]), float(share))


def sweep_concept(model: Model, name: str, args: argparse.Namespace) -> list[dict]:
    pairs = dataset.contrast_pairs(dataset.load_builtin(name), model, limit=args.pairs)
    options = training.TrainOptions(threads=args.threads)
    states = training.hidden_states(model, [p for pair in pairs for p in pair], options)
    pos, neg = states[0::2], states[1::2]
    _, how = training.chosen(model, pos, neg, pairs, options)
    tried = [_candidate(text) for text in str(how["candidates"]).split()]
    settings = evaluate.EvalSettings(strengths=(-1.0, 0.0, 1.0), samples=args.samples)
    probes = dataset.load_builtin(name).probes
    rows_out = []
    for candidate in tried:
        fixed = replace(options, method=candidate.method, layers=candidate.layers)
        vector = training.finish(model, pos, neg, pairs, fixed, name=name)
        rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
        with evaluate.context(model, settings, args.threads) as ctx:
            result = evaluate.sweep(ctx, rows, candidate.layers, probes, settings)
        low, high = result.nearest(-1.0), result.nearest(1.0)
        assert low and high
        row = {
            "concept": name,
            "candidate": candidate.describe(),
            "held_in_effect": round(candidate.effect, 3),
            "scale_estimate": round(candidate.scale, 3),
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
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
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
