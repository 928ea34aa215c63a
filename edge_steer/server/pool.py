"""The vectors requests may name, for the one model being served.

Only names: stored vectors that fit the model, built-in concepts (trained on first use when
the server allows it) and presets. A request can never make the server open a path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import dataset, library, steering, store, training, vectors
from ..engine import Model
from ..errors import BadInput, EdgeSteerError
from ..vectors import Key, recommended_range
from .api_error import ApiError

# for a vector never evaluated: ±1 is the calibrated strength, within the fluency budget
# (±2 costs more perplexity than eval accepts: docs/results.md)
DEFAULT_RANGE = (-1.0, 1.0)


@dataclass
class VectorPool:
    """What requests may name for `model`: its vectors (the model's `library.VectorLibrary`,
    shared by the three threads that use it: requests check names, the engine thread sums
    rows, the trainer adds what it trained) and presets, named steering specs."""

    model: Model
    allow_train: bool = False
    presets: dict[str, dict[str, float]] = field(default_factory=dict)
    layers: tuple[int, int] | None = None  # --layers: a vector outside them steers nothing
    threads: int | None = None  # --threads, for concepts trained on first use

    @property
    def library(self) -> library.VectorLibrary:
        return library.for_model(self.model)

    def untrained(self, names: Iterable[str]) -> list[str]:
        """The `names` with no vector read yet: built-in concepts to train first."""
        return self.library.missing(names)

    def train(self, name: str, progress: training.Progress | None = None) -> None:
        """Train built-in concept `name` for this model and keep it (the trainer's thread:
        its decodes take turns with the engine thread's, see engine.Model.lock)."""
        self.library.get(
            name,
            lambda _: library.resolve(self.model, name, progress=progress, threads=self.threads),
        )

    def check(
        self, steering: Mapping[str, float], param: str = "steering", switchable: Iterable[str] = ()
    ) -> dict[str, float]:
        """The request's steering, validated: known names, numeric strengths (their total is
        capped by the caller). Reads stored files here, in the request, so that a bad file is
        the client's 4xx. A 0 switches off one of `switchable` (the preset's vectors, which
        may be files) or a known vector: a typo is refused, not ignored."""
        checked: dict[str, float] = {}
        off = {vectors.name_key(name) for name in switchable}
        for name, strength in steering.items():
            _check_strength(name, strength, param)
            if strength != 0:
                self._ensure_known(name, param)
                self._ensure_in_layers(name, param)
            elif vectors.name_key(name) not in off:
                self._ensure_known(name, param)
            checked[name] = float(strength)
        return checked

    def check_layers(self, steering: Mapping[str, float], param: str = "steering") -> None:
        """After a concept was trained on first use: its blocks are known now."""
        for name, strength in steering.items():
            if strength != 0:
                self._ensure_in_layers(name, param)

    def _ensure_in_layers(self, name: str, param: str) -> None:
        if self.layers is None or self.library.missing([name]):
            return  # a concept trained on first use: checked once trained (check_layers)
        vector = self.library.get(name)
        if not steering.in_layers(self.layers, vector):
            first, last = self.layers
            raise ApiError(
                f"vector {name!r} steers blocks {vectors.block_span(vector.layers)}, none of "
                f"them within this server's --layers {first}-{last}: it would steer nothing",
                param=param,
                code="vector_outside_layers",
            )

    def _ensure_known(self, name: str, param: str) -> None:
        if not self.library.missing([name]):
            return
        try:
            store.check_name(name)  # before the file system sees it, as part of a path
        except BadInput:
            raise self._unknown(name, param) from None  # as for any name the store lacks
        path = store.stored_vector(name, self.model.path)
        if path is None:
            if self._trainable(name):
                return  # trained on first use, off the engine thread (lanes.py)
            raise self._unknown(name, param)
        try:
            vector = vectors.read(path)
        except EdgeSteerError as exc:  # damaged on disk: the request cannot use it
            said = str(exc).replace(str(path), f"stored vector {name!r}")  # not where it lives
            raise ApiError(said, status=422, param=param, code="damaged_vector") from None
        try:
            self.library.add(name, vector)
        except EdgeSteerError as exc:
            raise ApiError(str(exc), param=param, code="vector_for_another_model") from None

    def _trainable(self, name: str) -> bool:
        return self.allow_train and library.is_builtin(name)

    def _unknown(self, name: str, param: str) -> ApiError:
        if library.is_builtin(name):  # whatever other models have of it
            return ApiError(
                f"built-in concept {name!r} is not trained for {self.model.name} yet: train "
                f"it (edge-steer train {name.lower()} --model ...) or start the server with "
                "--allow-train to train built-in concepts on first use",
                param=param,
                code="unknown_vector",
            )
        elsewhere = [p for p in store.stored_vectors() if store.is_named(p, name)]
        if elsewhere:
            return ApiError(
                f"vector {name!r} was made for another model, not {self.model.name}: "
                f"train it for this one (edge-steer train {name} --model ...)",
                param=param,
                code="vector_for_another_model",
            )
        shown = name if len(name) <= 64 else f"{name[:64]}..."
        return ApiError(
            f"unknown vector {shown!r}: GET /v1/vectors lists this model's vectors",
            param=param,
            code="unknown_vector",
        )

    def rows(self, steering: Mapping[str, float]) -> np.ndarray | None:
        """The summed steering rows; every name must be read (`untrained` says which are
        not)."""
        return self.library.rows(steering)

    def catalogue(self) -> list[dict[str, object]]:
        """GET /v1/vectors: what fits this model, with the strength range to offer."""
        listed: dict[str, dict[str, object]] = {}
        mine = store.model_vectors_dir(self.model.path)
        for path in [*sorted(mine.glob("*.gguf")), *sorted(store.vectors_dir().glob("*.gguf"))]:
            if path.stem not in listed and (entry := self._entry(path)):
                listed[path.stem] = entry
        if self.allow_train:
            for name in dataset.builtin_names():
                listed.setdefault(name, _untrained(name))
        return list(listed.values())

    def _entry(self, path: Path) -> dict[str, object] | None:
        try:
            vector = vectors.read(path)
            vectors.check_fits(vector, self.model.n_layer, self.model.n_embd, path.name)
        except EdgeSteerError:
            return None  # damaged or made for another model: not offered
        evaluated = recommended_range(vector)
        return {
            "id": path.stem,
            "object": "vector",
            "concept": vector.metadata.get(Key.CONCEPT),
            "layers": [min(vector.layers), max(vector.layers)] if vector.layers else None,
            "calibrated": vectors.is_calibrated(vector),
            "recommended": list(evaluated or DEFAULT_RANGE),
            "evaluated": evaluated is not None,
            "trained": True,
            "max_strength": vectors.MAX_STRENGTH,
        }


def _untrained(name: str) -> dict[str, object]:
    return {
        "id": name,
        "object": "vector",
        "concept": name,
        "layers": None,
        "calibrated": True,
        "recommended": list(DEFAULT_RANGE),
        "evaluated": False,
        "trained": False,  # the first request that names it waits for training
        "max_strength": vectors.MAX_STRENGTH,
    }


def _check_strength(name: object, strength: object, param: str) -> None:
    if not isinstance(name, str):
        raise ApiError("steering names must be strings", param=param, code="invalid_steering")
    cap = vectors.MAX_STRENGTH
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ApiError(
            f"strength of {name!r} must be a number, got {type(strength).__name__}",
            param=param,
            code="invalid_steering",
        )
    if not -cap <= strength <= cap:  # exact for any int, where a float may overflow; NaN fails
        raise ApiError(
            f"the strength of {name!r} is out of range: use a number between -{cap:g} and "
            f"{cap:g}, for all vectors together (±1 is clearly steered, ±2 strong)",
            param=param,
            code="invalid_steering",
        )
