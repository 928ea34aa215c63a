"""The set of vectors steering one model: resolve, validate, sum, hand to llama.cpp."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from . import library, vectors
from .engine import Context, Model
from .errors import BadInput


def parse_layers(text: str | None, n_layer: int) -> tuple[int, int] | None:
    """`A-B` (inclusive block numbers, as in direction.N) or `A`; checked against the model."""
    if text is None:
        return None
    first, last = layer_span(text)
    if not 1 <= first <= last <= n_layer - 1:
        raise BadInput(
            f"layer range {text} is outside the model's steerable blocks 1-{n_layer - 1}"
        )
    return first, last


def layer_span(text: object) -> tuple[int, int]:
    """`A-B` or `A` as (first, last): what can be checked before a model is loaded."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text) if isinstance(text, str) else None
    if not match:
        raise BadInput(f"bad layer range {text!r}: use A-B with block numbers, e.g. 4-12")
    first = int(match[1])
    last = int(match[2]) if match[2] else first
    if first > last:
        raise BadInput(f"layer range {text} runs backwards: use {last}-{first}")
    return first, last


def in_layers(span: tuple[int, int] | None, vector: vectors.ControlVector) -> bool:
    """Whether `vector` has a direction in blocks `span` (all blocks when None)."""
    return span is None or any(span[0] <= layer <= span[1] for layer in vector.layers)


def check_in_layers(span: tuple[int, int] | None, name: str, vector: vectors.ControlVector) -> None:
    """A vector with no direction in the chosen blocks would steer nothing, silently."""
    if span is not None and not in_layers(span, vector):
        first, last = span
        raise BadInput(
            f"layers {first}-{last} hold none of {name}'s blocks "
            f"({vectors.block_span(vector.layers)}): pick blocks among them"
        )


@dataclass
class Steering:
    """Named vectors with strengths, for one context; `rows()` is their weighted sum per
    block. The vectors come from the model's `library.VectorLibrary`, read once."""

    model: Model
    layers: tuple[int, int] | None = None
    active: dict[str, tuple[vectors.ControlVector, float]] = field(default_factory=dict)
    resolve: library.Resolver | None = None  # name -> file; default: store lookup only

    def set(self, name: str, strength: float) -> None:
        """Add or re-weight a vector; strength 0 removes it. A name means the vector already
        active under another spelling (`HAPPY` for `happy`, `./v.gguf` for `v.gguf`)."""
        name = self._spelled(name)
        if strength == 0:
            self.active.pop(name, None)
            return
        vectors.check_strengths(self.strengths() | {name: strength})
        if name in self.active:
            vector = self.active[name][0]
        else:
            vector = library.for_model(self.model).get(name, self.resolve)
            check_in_layers(self.layers, name, vector)
            if not any(np.any(d) for d in vector.directions.values()):
                raise BadInput(f"{name} holds only zeros, which steer nothing: use another vector")
        self.active[name] = (vector, strength)

    def add(self, name: str, strength: float) -> None:
        """`set` to the strength it has plus `strength`: a spec's repeats add up."""
        active = self.active.get(self._spelled(name))
        self.set(name, (active[1] if active else 0.0) + strength)

    def _spelled(self, name: str) -> str:
        """`name` as the active vector it means was first spelled; else as given."""
        meant = vectors.identity(name)
        return next((given for given in self.active if vectors.identity(given) == meant), name)

    def strengths(self) -> dict[str, float]:
        return {name: strength for name, (_, strength) in self.active.items()}

    def rows(self) -> np.ndarray | None:
        if not self.active:
            return None
        m = self.model
        return vectors.combine(self.active.values(), m.n_layer, m.n_embd)

    def apply(self, ctx: Context) -> None:
        shape = (self.model.n_layer, self.model.n_embd)
        if shape != (ctx.model.n_layer, ctx.model.n_embd):
            raise BadInput(
                f"this steering was built for {self.model.name} ({shape[0]} blocks of "
                f"{shape[1]}), the context is on {ctx.model.name}: build one for that model"
            )
        first, last = self.layers or (1, self.model.n_layer - 1)
        ctx.set_steering(self.rows(), first, last)


def build(
    model: Model,
    specs: list[str],
    layers: str | None,
    resolve: library.Resolver | None = None,
) -> Steering:
    steering = Steering(model, parse_layers(layers, model.n_layer), resolve=resolve)
    for name, strength in vectors.spec_strengths(specs).items():
        steering.add(name, strength)
    return steering
