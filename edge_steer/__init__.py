"""edge-steer: steer local GGUF language models with control vectors, natively in llama.cpp."""

# llama.cpp's libraries must be loaded before numpy's: with numpy loaded first, a CUDA build of
# llama-cpp-python (OpenMP, GCC's libgomp) segfaulted inside llama_model_load_from_file on an
# H100 machine, even with no layers on the GPU. Loading llama_cpp first avoids it.
import llama_cpp  # noqa: F401

__version__ = "0.1.0"
