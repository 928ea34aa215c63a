"""edge-steer: steer local GGUF language models with control vectors, natively in llama.cpp."""

__version__ = "0.1.0"
