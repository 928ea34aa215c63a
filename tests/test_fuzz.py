"""Fuzzing the readers: every mutated file ends in our one-line error or a valid vector.

Never a crash, a foreign exception, a hang (each case runs under a 5 s alarm) or a numpy
warning, which a user would see on stderr (bit flips make signalling NaNs).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import safetensors_bytes
from typer.testing import CliRunner

from edge_steer import convert, gguffile, model_files, offload, vectors
from edge_steer.cli import app
from edge_steer.errors import EdgeSteerError

CASES = 400
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random damage: bit flips, a overwritten run, a cut, a spliced or dropped chunk, or
    a huge little-endian count written over the header (where GGUF keeps its counts)."""
    buf = bytearray(data)
    kind = rng.integers(6)
    at = int(rng.integers(len(buf)))
    if kind == 0:
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        run = rng.integers(256, size=int(rng.integers(1, 33)), dtype=np.uint8).tobytes()
        buf[at : at + len(run)] = run
    elif kind == 2:
        del buf[at:]
    elif kind == 3:
        buf[at:at] = buf[int(rng.integers(len(buf))) :][: int(rng.integers(1, 64))]
    elif kind == 4:
        del buf[at : at + int(rng.integers(1, 64))]
    else:
        big = int(rng.choice([2**31, 2**32 - 1, 2**40, 2**63 - 1, 7, 0]))
        at = int(rng.integers(min(64, len(buf))))
        buf[at : at + 8] = big.to_bytes(8, "little")
    return bytes(buf)


def flip_data(data: bytes, rng: np.random.Generator, data_start: int) -> bytes:
    """Damage only the tensor data, header intact: flipped bits, often in a float's exponent
    (NaN, Inf, 1e38), as a bad disk or a broken copy would."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        i = int(rng.integers(data_start, len(buf)))
        buf[i] ^= 1 << int(rng.integers(8)) if rng.random() < 0.5 else 0x7F
    return bytes(buf)


def cases(seed: int, data: bytes, data_start: int | None = None) -> Iterator[bytes]:
    rng = np.random.default_rng(seed)
    for _ in range(CASES):
        if data_start is not None and rng.random() < 0.5:
            yield flip_data(data, rng, data_start)
        else:
            yield mutate(data, rng)


def _alarm(*_args) -> None:
    raise TimeoutError("reader hung")


def run_fuzz(
    tmp_path, suffix: str, data: bytes, read: Callable, seed: int, data_start: int | None = None
) -> dict[str, int]:
    outcomes = {"valid": 0, "error": 0}
    path = tmp_path / f"fuzz{suffix}"
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i, mutated in enumerate(cases(seed, data, data_start)):
            path.write_bytes(mutated)
            signal.alarm(5)
            try:
                vector = read(path)
            except EdgeSteerError as exc:
                assert "\n" not in str(exc), f"case {i}: multi-line error {exc!r}"
                outcomes["error"] += 1
            except Exception as exc:  # anything else is a bug in our reader
                pytest.fail(f"case {i} ({suffix}): {type(exc).__name__}: {exc}")
            else:
                if isinstance(vector, vectors.ControlVector):
                    vectors.validate(vector.directions, str(path))
                outcomes["valid"] += 1
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return outcomes


def sample_vector() -> vectors.ControlVector:
    rng = np.random.default_rng(0)
    return vectors.ControlVector(
        {n: rng.normal(size=16).astype(np.float32) for n in (1, 2, 5)},
        "llama",
        {"concept": "happy", "scale_gain": 1.0, "pairs": 64},
    )


def test_fuzz_gguf_reader(tmp_path) -> None:
    path = vectors.write(sample_vector(), tmp_path / "ok.gguf")
    data, start = path.read_bytes(), gguffile.read_header(path).data_offset
    outcomes = run_fuzz(tmp_path, ".gguf", data, vectors.read, seed=1, data_start=start)
    assert outcomes["error"] > CASES // 4  # the mutations really do damage files


def test_fuzz_model_header_checks_and_offload_plan(tmp_path, tiny_moe_path) -> None:
    """What every command reads of a model before llama.cpp sees it."""

    def read(path):
        model_files.check_model_file(path)
        return offload.read_weights(gguffile.read_header(path))

    data = tiny_moe_path.read_bytes()[: 1 << 16]  # the header and the first tensors
    outcomes = run_fuzz(tmp_path, ".gguf", data, read, seed=3)
    assert outcomes["error"] > CASES // 4


@pytest.mark.parametrize("command", ["info", "list", "list --json", "info --json"])
def test_fuzz_vectors_info_and_list(tmp_path, monkeypatch, command) -> None:
    """`vectors info FILE` and `vectors list` (of a store holding the file) on damaged files:
    exit 0 with the damage shown, or our one-line error; never a traceback."""
    monkeypatch.setenv("EDGE_STEER_HOME", str(tmp_path / "home"))
    stored = tmp_path / "home" / "vectors" / "v.gguf"
    stored.parent.mkdir(parents=True)
    path = vectors.write(sample_vector(), tmp_path / "ok.gguf")
    data, start = path.read_bytes(), gguffile.read_header(path).data_offset
    runner = CliRunner()
    for i, mutated in enumerate(cases(4, data, start)):
        if i == CASES // 4:
            break
        stored.write_bytes(mutated)
        args = command.split() + ([str(stored)] if command.startswith("info") else [])
        result = runner.invoke(app, ["vectors", *args])
        if result.exception and not isinstance(result.exception, SystemExit):
            pytest.fail(f"case {i}: {type(result.exception).__name__}: {result.exception}")
        assert result.exit_code in (0, 2), (i, result.output)
        if result.exit_code:
            assert result.output.count("\n") == 1 and "error:" in result.output, result.output


@pytest.mark.parametrize("suffix", [".npz", ".json", ".safetensors", ".npy"])
def test_fuzz_other_readers(tmp_path, suffix) -> None:
    vector = sample_vector()
    if suffix == ".npz":
        data = convert.save(vector, tmp_path / "ok.npz").read_bytes()
    elif suffix == ".json":
        rows = {str(n): d.tolist() for n, d in vector.directions.items()}
        data = json.dumps({"directions": rows, "model_hint": "llama"}).encode()
    elif suffix == ".npy":
        np.save(tmp_path / "ok.npy", np.stack(list(vector.directions.values())))
        data = (tmp_path / "ok.npy").read_bytes()
    else:
        data = safetensors_bytes({f"l.{n}": ("F32", d) for n, d in vector.directions.items()})
    outcomes = run_fuzz(tmp_path, suffix, data, lambda p: convert.load(p)[0], seed=2)
    assert outcomes["error"] > 0
