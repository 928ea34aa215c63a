"""Shared fixtures: the real demo model (Gemma 3 270M) and generated tiny llama models."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools.tiny_models import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def edge_steer_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tests' store out of the user's cache (the demo model is assembled here once)."""
    home = tmp_path_factory.mktemp("edge-steer-home")
    os.environ["EDGE_STEER_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def demo_path(edge_steer_home: Path) -> Path:
    from edge_steer import model_files

    return model_files.resolve_model("demo")


@pytest.fixture(scope="session")
def chat_path(edge_steer_home: Path) -> Path:
    """SmolLM2-135M-Instruct: a real instruct model with a chat template (`demo-chat`)."""
    from edge_steer import model_files

    return model_files.resolve_model("demo-chat")


@pytest.fixture(scope="session")
def chat_model(chat_path: Path):
    from edge_steer.engine import Model

    with Model(chat_path) as model:
        yield model


@pytest.fixture(scope="session")
def demo_model(demo_path: Path):
    from edge_steer.engine import Model

    with Model(demo_path) as model:
        yield model


@pytest.fixture(scope="session")
def tiny_dense_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-mistral.gguf")


@pytest.fixture(scope="session")
def tiny_moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-mixtral.gguf", moe=True)


@pytest.fixture(scope="session")
def tiny_dense(tiny_dense_path: Path):
    from edge_steer.engine import Model

    with Model(tiny_dense_path) as model:
        yield model


def assert_steers_probes_monotonically(model, vector, concept: str) -> None:
    """-2..2 moves the concept's held-out probes in order, at least 0.5 nats at ±1, within
    x1.25 perplexity on neutral text at ±1."""
    from edge_steer import dataset, metrics, vectors
    from edge_steer.engine import Context

    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    probes = dataset.load_builtin(concept).probes
    neutral = " ".join(dataset.neutral_text().split()[:300])
    margins, ppl = {}, {}
    with Context(model, n_ctx=512) as ctx:
        for strength in (-2, -1, 0, 1, 2):
            ctx.set_steering(rows * np.float32(strength) if strength else None)
            margins[strength] = metrics.probe_margin(ctx, probes)
            ppl[strength] = metrics.perplexity(ctx, neutral)
    effects = [margins[s] - margins[0] for s in (-2, -1, 0, 1, 2)]
    assert effects == sorted(effects), f"not monotonic: {effects}"
    assert effects[3] > 0.5 and effects[1] < -0.5, effects
    assert ppl[1] / ppl[0] <= 1.25 and ppl[-1] / ppl[0] <= 1.25, ppl


def calibration_fluency(model, vector) -> dict[float, tuple[float, float]]:
    """(perplexity, mean next-token entropy) of the calibration text unsteered (0) and at +1
    and -1, from the file's own directions, measured the way calibration measures them."""
    from edge_steer import calibrate, dataset, metrics, vectors
    from edge_steer.engine import Context

    rows = vectors.combine([(vector, 1.0)], model.n_layer, model.n_embd)
    span = (vector.layers[0], vector.layers[-1])
    text, tokens = dataset.calibration_text(), calibrate.TOKENS
    measured = {}
    with Context(model, n_ctx=tokens + 16, n_batch=tokens + 16) as ctx:
        for sign in (0.0, 1.0, -1.0):
            ctx.set_steering(rows * np.float32(sign) if sign else None, *span)
            measured[sign] = metrics.fluency(ctx, text, window=tokens, limit=tokens)
    return measured


def random_rows(model, layers: dict[int, float], seed: int = 0) -> np.ndarray:
    """An (n_layer, n_embd) steering array with random directions of the given norms."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((model.n_layer, model.n_embd), dtype=np.float32)
    for layer, norm in layers.items():
        direction = rng.normal(size=model.n_embd)
        rows[layer] = norm * direction / np.linalg.norm(direction)
    return rows


def safetensors_bytes(tensors: dict[str, tuple[str, np.ndarray]], meta=None) -> bytes:
    """A .safetensors file: u64 header length, JSON header, raw tensor bytes."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        blob = array.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_raw(path, tensors: dict, arch: str = "controlvector", meta=None):
    """Write any tensors as they are (bypassing our writer's checks and float32 conversion);
    `meta(writer)` adds key-value fields."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    if meta is not None:
        meta(writer)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
