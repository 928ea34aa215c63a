"""Parity with llama.cpp's own binary: greedy `edge-steer generate` against `llama-completion`
built from the same vendored llama.cpp, on the same machine, with and without a vector.

    python tools/parity.py [--model demo] [--vector happy] [--cache ~/.cache/edge-steer/parity]

Downloads the sdist of the installed llama-cpp-python version (pip download), builds only
the `llama-completion` target with CMake into the cache folder (once; about 10 minutes on 2
cores), trains or finds the vector for the model, then runs both programs greedily
(`--temp 0 --repeat-penalty 1.0`) with the file at strength 0, +1 and -1
(`--control-vector-scaled FILE:S` there, `--vector FILE:S` here) and compares the text.
Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

# llama.cpp's AMX kernels crash on the CPUs that have them, so edge-steer leaves them unused
# (edge_steer.ggml.drop_amx_buffer); the binary is built without them (an explicit -mno
# outlasts the build's -march=native), so both put weights in the same AVX-512 layouts
NO_AMX = ["-DCMAKE_C_FLAGS=-mno-amx-int8", "-DCMAKE_CXX_FLAGS=-mno-amx-int8"]
X86 = platform.machine().lower() in ("x86_64", "amd64")

PROMPT = "The best thing about mornings is"
TOKENS = 32


def build(cache: Path, target: str = "llama-completion") -> Path:
    """`target` (llama-completion, llama-server) from the installed llama-cpp-python's
    vendored llama.cpp."""
    release = version("llama-cpp-python")
    binary = cache / f"build-{release}" / "bin" / target
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{release}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                "-d",
                str(cache),
                f"llama-cpp-python=={release}",
            ],
            check=True,
        )
    source = cache / f"llama_cpp_python-{release}"
    if not source.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(cache, filter="data")
    llama = source / "vendor" / "llama.cpp"
    out = binary.parent.parent
    subprocess.run(
        [
            "cmake",
            "-S",
            str(llama),
            "-B",
            str(out),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            f"-DLLAMA_BUILD_SERVER={'ON' if target == 'llama-server' else 'OFF'}",
            *(NO_AMX if X86 else []),
        ],
        check=True,
    )
    subprocess.run(["cmake", "--build", str(out), "--target", target, "-j"], check=True)
    return binary


# the same greedy run on both sides: no repetition penalty, llama.cpp's default elsewhere
GREEDY = ["-p", PROMPT, "--temp", "0", "--repeat-penalty", "1.0", "-n", str(TOKENS)]


def edge_steer(*args: str) -> str:
    """stdout of `edge-steer ARGS` run by this Python."""
    command = [sys.executable, "-m", "edge_steer", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def ours(model: str, vector: Path | None, strength: float) -> str:
    spec = ["--vector", f"{vector}:{strength}"] if vector else []
    return edge_steer("generate", "-m", model, *GREEDY, *spec)


def theirs(binary: Path, model_path: str, vector: Path | None, strength: float) -> str:
    spec = ["--control-vector-scaled", f"{vector}:{strength}"] if vector else []
    command = [str(binary), "-m", model_path, *GREEDY, "-no-cnv", "--no-warmup", "-c", "4096"]
    return subprocess.run([*command, *spec], check=True, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--vector", default="happy")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/edge-steer/parity")
    args = parser.parse_args()
    binary = build(args.cache)
    model_path = edge_steer("pull", args.model).strip()
    edge_steer(
        "train", args.vector, "-m", args.model, "-o", str(args.cache / f"{args.vector}.gguf")
    )
    vector = args.cache / f"{args.vector}.gguf"
    same = True
    for strength in (0.0, 1.0, -1.0):
        used = vector if strength else None
        a, b = ours(args.model, used, strength), theirs(binary, model_path, used, strength)
        match = a.strip() == b.strip()[len(PROMPT) :].strip() or b.strip().endswith(a.strip())
        same &= match
        print(
            f"strength {strength:+g}: {'same' if match else 'DIFFERENT'}\n  edge-steer: {a!r}\n"
            f"  llama.cpp:  {b!r}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
