"""Control-vector files: round trip, validation, SPEC parsing, summing."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_raw

from edge_steer import vectors
from edge_steer.errors import BadInput, DamagedFile


def make(layers=(1, 2, 3), n_embd=8, seed=0) -> vectors.ControlVector:
    rng = np.random.default_rng(seed)
    return vectors.ControlVector(
        {n: rng.normal(size=n_embd).astype(np.float32) for n in layers},
        "llama",
        {"concept": "test", "scale": 0.5, "layer_first": 2},
    )


def test_round_trip(tmp_path) -> None:
    vec = make()
    back = vectors.read(vectors.write(vec, tmp_path / "v.gguf"))
    assert back.layers == [1, 2, 3] and back.model_hint == "llama"
    assert back.metadata == vec.metadata
    for n in vec.layers:
        assert np.array_equal(back.directions[n], vec.directions[n])


def test_write_is_atomic_and_leaves_no_temp(tmp_path) -> None:
    vectors.write(make(), tmp_path / "v.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


@pytest.mark.parametrize(
    ("directions", "message"),
    [
        ({0: np.ones(4, np.float32)}, "direction.0"),
        ({1: np.array([1, np.nan, 0, 0], np.float32)}, "NaN"),
        ({1: np.array([1, np.inf, 0, 0], np.float32)}, "NaN or Inf"),
        ({1: np.ones(4, np.float32), 2: np.ones(5, np.float32)}, "unlike the other layers"),
        ({1: np.ones((2, 2), np.float32)}, "1-D F32"),
        ({1: np.ones(4, np.float16)}, "1-D F32"),
        ({}, "no direction.N"),
    ],
)
def test_bad_files_are_refused(tmp_path, directions, message) -> None:
    path = write_raw(tmp_path / "bad.gguf", {f"direction.{n}": d for n, d in directions.items()})
    with pytest.raises(DamagedFile, match=message):
        vectors.read(path)


def test_other_tensors_and_models_are_refused(tmp_path) -> None:
    path = write_raw(tmp_path / "x.gguf", {"token_embd.weight": np.ones(4, np.float32)})
    with pytest.raises(DamagedFile, match="unexpected tensor"):
        vectors.read(path)
    path = write_raw(tmp_path / "m.gguf", {"direction.1": np.ones(4, np.float32)}, "llama")
    with pytest.raises(BadInput, match="not a control vector"):
        vectors.read(path)


def test_not_gguf_and_truncated(tmp_path) -> None:
    (tmp_path / "a.gguf").write_text("hello")
    with pytest.raises(DamagedFile, match="not a GGUF"):
        vectors.read(tmp_path / "a.gguf")
    data = vectors.write(make(), tmp_path / "b.gguf").read_bytes()
    (tmp_path / "b.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFile, match="damaged"):
        vectors.read(tmp_path / "b.gguf")


def test_check_fits() -> None:
    vec = make(layers=(1, 5), n_embd=8)
    vectors.check_fits(vec, n_layer=6, n_embd=8, source="v")
    with pytest.raises(BadInput, match="n_embd 8 but the model has 16"):
        vectors.check_fits(vec, n_layer=6, n_embd=16, source="v")
    with pytest.raises(BadInput, match=r"direction\.5"):
        vectors.check_fits(vec, n_layer=5, n_embd=8, source="v")


def test_combine_is_the_weighted_sum() -> None:
    a, b = make(seed=1), make(layers=(2, 4), seed=2)
    rows = vectors.combine([(a, 0.5), (b, -1.0)], n_layer=5, n_embd=8)
    assert not rows[0].any()
    assert np.allclose(rows[2], 0.5 * a.directions[2] - b.directions[2])
    assert np.allclose(rows[4], -b.directions[4])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("lazy", [("lazy", 1.0)]),
        ("lazy:-1.5", [("lazy", -1.5)]),
        (" happy : 0.5 ", [("happy", 0.5)]),
        ("lazy:-1,happy:0.5", [("lazy", -1.0), ("happy", 0.5)]),
        ("dir/v.gguf:2", [("dir/v.gguf", 2.0)]),
        ("C:\\v\\x.gguf:2", [("C:\\v\\x.gguf", 2.0)]),
    ],
)
def test_parse_specs(spec, expected) -> None:
    assert [(n.strip(), s) for n, s in vectors.parse_specs([spec])] == expected


@pytest.mark.parametrize("spec", ["lazy:abc", ":1", "lazy:1:2", "lazy:nan", "lazy:inf", ":"])
def test_malformed_specs(spec) -> None:
    with pytest.raises(BadInput, match="bad vector spec"):
        vectors.parse_specs([spec])


def test_stored_names_ignore_case(tiny_dense, tiny_dense_path) -> None:
    """`--vector Happy` is the stored `happy` (one name, one file, as on a case-insensitive
    disk); a new vector is stored under the lower-case name."""
    from edge_steer import library, store

    assert store.file_name("Happy") == "happy.gguf"
    assert library.stored_path(tiny_dense, "Zany").name == "zany.gguf"
    own = store.model_vectors_dir(tiny_dense_path)
    own.mkdir(parents=True, exist_ok=True)
    path = vectors.write(vectors.ControlVector({1: np.ones(64, np.float32)}), own / "zany.gguf")
    assert store.stored_vector("ZANY", tiny_dense_path) == path
    assert library.stored_path(tiny_dense, "Zany") == path
    assert store.stored_vector("zan", tiny_dense_path) is None
    path.unlink()
