"""Defaults and environment variables, each named once (as huggingface_hub's constants.py).

Variables are read when used, not at import, so a changed environment (a test, a server's
worker) counts."""

from __future__ import annotations

import os

DEFAULT_CTX = 4096  # tokens of context wherever none is given: CLI, server lanes, fit checks
MAX_THREADS = 512  # GGML_MAX_N_THREADS: --threads of every command, worker included
RANDOM_SEED = (1 << 32) - 1  # LLAMA_DEFAULT_SEED: llama.cpp draws a new seed each time

HOME_ENV = "EDGE_STEER_HOME"  # vectors, chat history (default $XDG_CACHE_HOME/edge-steer)
MODEL_ENV = "EDGE_STEER_MODEL"  # the model used when --model is not given
RPC_ENV = "EDGE_STEER_RPC"  # HOST:PORT,... of `edge-steer worker`s, as --rpc
API_KEY_ENV = "EDGE_STEER_API_KEY"  # serve --api-key
VRAM_ENV = "EDGE_STEER_VRAM"  # plan as if this much GPU memory were free (limit or rehearse)
VERBOSE_ENV = "EDGE_STEER_VERBOSE"  # 1: llama.cpp's own log on stderr
COLUMNS_ENV = "COLUMNS"  # a width the user set: rich keeps to it, piped output too
# set, not read: ggml's tiled K-quant products, off where rows must not change with the rows
# beside them (ggml.one_row_kernels)
TILED_MATMUL_ENV = "GGML_CPU_TILED_MM"


def env(name: str) -> str:
    """The variable's value, stripped; "" when it is unset."""
    return os.environ.get(name, "").strip()


def set_env(name: str, value: str) -> None:
    """Set a variable for this process, where the C libraries it loaded read it too."""
    os.environ[name] = value


def unset_env(name: str) -> None:
    """Drop a variable for this process (and the libraries that would read it)."""
    os.environ.pop(name, None)
