"""The set of vectors steering one model: resolve, validate, sum, hand to llama.cpp."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import store, vectors
from .engine import Context, Model
from .errors import BadInput


def parse_layers(text: str | None, n_layer: int) -> tuple[int, int] | None:
    """`A-B` (inclusive block numbers, as in direction.N) or `A`; checked against the model."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise BadInput(f"bad layer range {text!r}: use A-B with block numbers, e.g. 4-12")
    first = int(match[1])
    last = int(match[2]) if match[2] else first
    if not 1 <= first <= last <= n_layer - 1:
        raise BadInput(
            f"layer range {text} is outside the model's steerable blocks 1-{n_layer - 1}"
        )
    return first, last


@dataclass
class Steering:
    """Named vectors with strengths; `rows()` is their weighted sum per block."""

    model: Model
    layers: tuple[int, int] | None = None
    active: dict[str, tuple[vectors.ControlVector, float]] = field(default_factory=dict)
    resolve: Callable[[str], Path] | None = None  # name -> file; default: store lookup only

    def set(self, name: str, strength: float) -> None:
        """Add or re-weight a vector; strength 0 removes it."""
        if strength == 0:
            self.active.pop(name, None)
            return
        vectors.check_strengths(self.strengths() | {name: strength})
        vector = self.active[name][0] if name in self.active else self._load(name)
        self.active[name] = (vector, strength)

    def _load(self, name: str) -> vectors.ControlVector:
        if self.resolve is not None:
            path = self.resolve(name)
        else:
            path = store.resolve_vector(name, self.model.path)
        vector = vectors.read(path)
        vectors.check_fits(vector, self.model.n_layer, self.model.n_embd, str(path))
        return vector

    def strengths(self) -> dict[str, float]:
        return {name: strength for name, (_, strength) in self.active.items()}

    def rows(self) -> np.ndarray | None:
        if not self.active:
            return None
        m = self.model
        return vectors.combine(self.active.values(), m.n_layer, m.n_embd)

    def apply(self, ctx: Context) -> None:
        first, last = self.layers or (1, self.model.n_layer - 1)
        ctx.set_steering(self.rows(), first, last)


def build(
    model: Model,
    specs: list[str],
    layers: str | None,
    resolve: Callable[[str], Path] | None = None,
) -> Steering:
    steering = Steering(model, parse_layers(layers, model.n_layer), resolve=resolve)
    for name, strength in vectors.spec_strengths(specs).items():
        steering.set(name, strength)
    return steering
