"""Vectors by name for one model: the stored file, or train it now from a concept and store
it; and `VectorLibrary`, the vectors a process has read for a model, shared by everything
that steers it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from . import dataset, files, store, training, vectors
from .engine import Model
from .errors import BadInput, NotFound
from .vectors import Key

Resolver = Callable[[str], Path]  # a vector's name -> its file (may train it first)

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
    limit: int | None = None,
) -> list[tuple[str, str]]:
    """Training pairs from explicit prompts, persona words, or the built-in concept `name`:
    at most `limit`, picked by `seed` (None: every line of a pairs file, else
    DEFAULT_PAIRS persona x continuation pairs)."""
    check_sources(name, positive, negative, pairs_file, limit, seed)
    if pairs_file:
        return _sample(dataset.load_pairs_jsonl(pairs_file), seed, limit)
    if positive or negative:
        concept = dataset.from_personas(name, positive or "", negative or "")
    else:
        concept = dataset.load_builtin(name)
    return dataset.contrast_pairs(concept, model, seed=seed, limit=limit or DEFAULT_PAIRS)


def check_sources(
    name: str,
    positive: str | None,
    negative: str | None,
    pairs_file: str | None,
    limit: int | None = None,
    seed: int = 0,
) -> None:
    """One source of pairs, and a concept of the user's own under a name of its own: stored
    as `happy`, it would be steered and evaluated as the built-in happy."""
    if limit is not None and limit < 2:
        raise BadInput(f"--limit {limit}: training needs at least 2 pairs")
    if seed < 0:  # numpy's generator takes none (a traceback after the model loaded)
        raise BadInput(f"--seed {seed}: use 0 or more (it picks the pairs and their order)")
    if pairs_file and (positive or negative):
        raise BadInput("pass either --pairs or --positive/--negative, not both")
    if (pairs_file or positive or negative) and is_builtin(name):
        raise BadInput(
            f"{name!r} is a built-in concept: name your own another way (e.g. "
            f"{name.lower()}-mine), or leave out --positive/--negative/--pairs to train the "
            "built-in one"
        )


def _sample(pairs: list[tuple[str, str]], seed: int, limit: int | None) -> list[tuple[str, str]]:
    """At most `limit` of a file's pairs, picked at random by `seed`, in the file's order."""
    if limit is None or len(pairs) <= limit:
        return pairs
    kept = np.random.default_rng(seed).choice(len(pairs), size=limit, replace=False)
    return [pairs[i] for i in sorted(kept)]


def train_vector(
    model: Model,
    name: str,
    pairs: list[tuple[str, str]],
    options: training.TrainOptions,
    progress: training.Progress | None = None,
) -> vectors.ControlVector:
    """A vector trained on `model`, keyed to it, not yet stored."""
    store.check_name(name)
    store.check_writable(stored_path(model, name))  # before minutes of training
    fingerprint = store.fingerprint(model.path)  # now: the file may go while training runs
    vector = training.train(model, pairs, options, name=name, progress=progress)
    vector.metadata[Key.MODEL_FINGERPRINT] = fingerprint
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


def is_builtin(name: str) -> bool:
    """Whether SPEC name `name` means a built-in concept (any case; never a path)."""
    return not files.looks_like_path(name) and name.lower() in dataset.builtin_names()


def check_retrain(names: Iterable[str]) -> None:
    """--retrain trains built-in concepts again from their own data; a vector of the user's
    (a file, or trained from pairs the store does not keep) has none, so a --retrain that
    names only those would change nothing."""
    names = list(names)
    if names and not any(is_builtin(name) for name in names):
        raise BadInput(
            f"--retrain trains built-in concepts again, and none of {', '.join(names)} is one: "
            "train your own with `edge-steer train NAME --pairs ...` (or persona words)"
        )


def resolve(
    model: Model,
    name: str,
    *,
    retrain: bool = False,
    progress: training.Progress | None = None,
    threads: int | None = None,
) -> Path:
    """A path for SPEC name `name`: a file, a stored vector, or a built-in concept trained now
    (on `threads`, the user's --threads: a first use trains as `train` does)."""
    builtin = is_builtin(name)
    name = name.lower() if builtin else name  # `Happy` is the built-in `happy`
    if not (builtin and retrain):
        try:
            return store.resolve_vector(name, model.path)
        except NotFound:
            if not builtin:
                raise
    pairs = contrast_pairs(model, name)
    options = training.TrainOptions(threads=threads)
    return train_and_store(model, name, pairs, options, progress)


class VectorLibrary:
    """The vectors of one model by name, each read (or trained) once and shared by whatever
    steers the model: the CLI's steering, the server's requests and its trainer thread, the
    llm plugin. Thread-safe; training runs outside the lock, so lookups never wait for it."""

    def __init__(self, model: Model):
        self.model = model
        self._vectors: dict[str, vectors.ControlVector] = {}
        self._lock = threading.Lock()

    def get(self, name: str, resolve: Resolver | None = None) -> vectors.ControlVector:
        """Vector `name`, from memory or else from the file `resolve(name)` gives (default:
        the store, never training), checked against the model's shape."""
        with self._lock:
            vector = self._vectors.get(name)
        if vector is not None:
            return vector
        path = (resolve or self._stored)(name)
        vector = vectors.read(path)
        self.add(name, vector, str(path))
        return vector

    def _stored(self, name: str) -> Path:
        return store.resolve_vector(name, self.model.path)

    def add(self, name: str, vector: vectors.ControlVector, source: str | None = None) -> None:
        """Keep `vector` as `name`, once it is checked against the model's shape (a BadInput
        naming `source` if it does not fit)."""
        vectors.check_fits(vector, self.model.n_layer, self.model.n_embd, source or name)
        with self._lock:
            self._vectors[name] = vector

    def drop(self, name: str) -> None:
        """Forget `name`, so that the next `get` reads (or trains) it again."""
        with self._lock:
            self._vectors.pop(name, None)

    def missing(self, names: Iterable[str]) -> list[str]:
        """The `names` not in memory yet."""
        with self._lock:
            return [name for name in names if name not in self._vectors]

    def rows(self, strengths: Mapping[str, float]) -> np.ndarray | None:
        """The strength-weighted sum per block (None for no vectors); every name must be in
        memory (`missing` says which are not)."""
        if not strengths:
            return None
        with self._lock:
            weighted = [(self._vectors[name], strength) for name, strength in strengths.items()]
        return vectors.combine(weighted, self.model.n_layer, self.model.n_embd)


_libraries: weakref.WeakKeyDictionary[Model, VectorLibrary] = weakref.WeakKeyDictionary()
_libraries_lock = threading.Lock()


def for_model(model: Model) -> VectorLibrary:
    """The one library of `model` in this process."""
    with _libraries_lock:
        found = _libraries.get(model)
        if found is None:
            found = _libraries[model] = VectorLibrary(model)
        return found
