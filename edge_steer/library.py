"""Vectors by name for one model: the stored file, or train it now from a concept and store it."""

from __future__ import annotations

from pathlib import Path

from . import dataset, files, store, training, vectors
from .engine import Model
from .errors import BadInput, NotFound
from .vectors import Key

DEFAULT_PAIRS = 128  # enough for a stable direction (held-out sign tests pass at 96)


def stored_path(model: Model, name: str) -> Path:
    """Where `model`'s vector `name` is, or would be stored (an existing file of that name
    in another case is the same vector)."""
    own = store.model_vectors_dir(model.path)
    return store.vector_in(own, store.check_name(name)) or own / store.file_name(name)


def contrast_pairs(
    model: Model,
    name: str,
    *,
    positive: str | None = None,
    negative: str | None = None,
    pairs_file: str | None = None,
    seed: int = 0,
    limit: int | None = DEFAULT_PAIRS,
) -> list[tuple[str, str]]:
    """Training pairs from explicit prompts, persona words, or the built-in concept `name`."""
    if pairs_file:
        if positive or negative:
            raise BadInput("pass either --pairs or --positive/--negative, not both")
        return dataset.load_pairs_jsonl(pairs_file)
    if positive or negative:
        concept = dataset.from_personas(name, positive or "", negative or "")
    else:
        concept = dataset.load_builtin(name)
    return dataset.contrast_pairs(concept, model, seed=seed, limit=limit)


def train_vector(
    model: Model,
    name: str,
    pairs: list[tuple[str, str]],
    options: training.TrainOptions,
    progress: training.Progress | None = None,
) -> vectors.ControlVector:
    """A vector trained on `model`, keyed to it, not yet stored."""
    store.check_name(name)
    vector = training.train(model, pairs, options, name=name, progress=progress)
    vector.metadata[Key.MODEL_FINGERPRINT] = store.fingerprint(model.path)
    return vector


def store_vector(model: Model, name: str, vector: vectors.ControlVector) -> Path:
    """Store (atomically replace) `model`'s vector `name`."""
    return vectors.write(vector, stored_path(model, name))


def train_and_store(
    model: Model,
    name: str,
    pairs: list[tuple[str, str]],
    options: training.TrainOptions,
    progress: training.Progress | None = None,
) -> Path:
    return store_vector(model, name, train_vector(model, name, pairs, options, progress))


def resolve(
    model: Model, name: str, *, retrain: bool = False, progress: training.Progress | None = None
) -> Path:
    """A path for SPEC name `name`: a file, a stored vector, or a built-in concept trained now."""
    builtin = not files.looks_like_path(name) and name.lower() in dataset.builtin_names()
    name = name.lower() if builtin else name  # `Happy` is the built-in `happy`
    if not (builtin and retrain):
        try:
            return store.resolve_vector(name, model.path)
        except NotFound:
            if not builtin:
                raise
    pairs = contrast_pairs(model, name)
    return train_and_store(model, name, pairs, training.TrainOptions(), progress)
