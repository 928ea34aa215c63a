"""edge-steer: steer local GGUF language models with control vectors, natively in llama.cpp.

    import edge_steer
    steered = edge_steer.load("demo", vectors={"happy": 1.0})
    print(steered.generate("The best thing about mornings is", max_tokens=40, temperature=0))

Names are imported on first use, so `import edge_steer` (and `edge-steer --help`) stays fast
and loads llama.cpp only when a model is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

_EXPORTS = {
    "load": "runtime",
    "load_model": "runtime",
    "open_context": "runtime",
    "steer": "runtime",
    "vector_file": "runtime",
    "Steered": "runtime",
    "Model": "engine",
    "Context": "engine",
    "Sampler": "engine",
    "SamplerSettings": "engine",
    "Steering": "steering",
    "ControlVector": "vectors",
    "read_vector": "vectors:read",
    "write_vector": "vectors:write",
    "train": "training",
    "TrainOptions": "training",
    "EdgeSteerError": "errors",
    "BadInput": "errors",
    "NotFound": "errors",
    "DamagedFile": "errors",
    "DoesNotFit": "errors",
    "NetworkError": "errors",
    "EngineError": "errors",
}
__all__ = [
    "BadInput",
    "Context",
    "ControlVector",
    "DamagedFile",
    "DoesNotFit",
    "EdgeSteerError",
    "EngineError",
    "Model",
    "NetworkError",
    "NotFound",
    "Sampler",
    "SamplerSettings",
    "Steered",
    "Steering",
    "TrainOptions",
    "__version__",
    "load",
    "load_model",
    "open_context",
    "read_vector",
    "steer",
    "train",
    "vector_file",
    "write_vector",
]

if TYPE_CHECKING:
    from .engine import Context, Model, Sampler, SamplerSettings
    from .errors import (
        BadInput,
        DamagedFile,
        DoesNotFit,
        EdgeSteerError,
        EngineError,
        NetworkError,
        NotFound,
    )
    from .runtime import Steered, load, load_model, open_context, steer, vector_file
    from .steering import Steering
    from .training import TrainOptions, train
    from .vectors import ControlVector
    from .vectors import read as read_vector
    from .vectors import write as write_vector


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_steer' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    if module != "errors":
        importlib.import_module(".runtime", __name__)  # llama.cpp before numpy (runtime.py)
    return getattr(importlib.import_module(f".{module}", __name__), attribute or name)
