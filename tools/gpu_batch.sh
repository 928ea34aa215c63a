#!/usr/bin/env bash
# The batching check on a lent GPU machine (no network there), in one call of under 10 minutes.
#
#   bash tools/gpu_batch.sh prepare [BASELINE]   here: fill .device/ (git-ignored, ~12 MB)
#   bash tools/gpu_batch.sh run                  there, with .device carried; results in $OUT
#
# `prepare` packs what the machine cannot fetch: llama-cpp-python's sdist without the parts a
# build never reads, the pure-Python wheels its image lacks, and BASELINE (a commit, default
# 8dc6f5f: per-row steering that stopped the graph) as the older server to compare. `run`
# builds the vendored llama.cpp with CUDA once for both sides (libllama for edge-steer, and
# llama-server), makes the Mistral 7B Q4_K_M stand-in meanwhile, runs the GPU tests, then
# tools/batch_bench.py with every layer on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local baseline="${1:-8dc6f5f}" release cache tmp
    release="$(python -c "from importlib.metadata import version; print(version('llama-cpp-python'))")"
    cache="$HOME/.cache/edge-steer/parity"
    rm -rf .device && mkdir -p .device/wheels "$cache"
    [ -f "$cache/llama_cpp_python-$release.tar.gz" ] || python -m pip download -q --no-deps \
        --no-binary llama-cpp-python -d "$cache" "llama-cpp-python==$release"
    tmp="$(mktemp -d)"
    tar xzf "$cache/llama_cpp_python-$release.tar.gz" -C "$tmp"
    (cd "$tmp/llama_cpp_python-$release" && rm -rf .git && cd vendor/llama.cpp &&
        rm -rf models docs tests examples benches conversion tools/ui/tests tools/mtmd/*.mp4)
    tar cJf .device/llama-cpp-python.tar.xz -C "$tmp" "llama_cpp_python-$release"
    rm -rf "$tmp"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp -d .device/wheels \
        gguf uvicorn starlette prompt_toolkit wcwidth diskcache
    git archive --format=tar.gz -o .device/before.tar.gz "$baseline"
    du -sh .device
}

run() {
    local src release build jobs site=/tmp/site
    jobs="$(nproc)"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl
    tar xJf .device/llama-cpp-python.tar.xz -C /tmp
    src="$(echo /tmp/llama_cpp_python-*)" && release="${src##*-}"
    cp -r "$src/llama_cpp" "$site/"
    mkdir -p "$site/llama_cpp_python-$release.dist-info"
    printf 'Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: %s\n' "$release" \
        > "$site/llama_cpp_python-$release.dist-info/METADATA"
    mkdir -p /tmp/before && tar xzf .device/before.tar.gz -C /tmp/before
    export PYTHONPATH="$site" PYTHONUNBUFFERED=1
    python3 tools/standins.py mistral-q4_k_m > "$OUT/standin.log" 2>&1 &
    local standin=$!
    build=/tmp/parity/build-$release  # where tools/parity.py looks for llama-server
    cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$OUT/build.log" 2>&1
    cmake --build "$build" --target llama-server -j "$jobs" >> "$OUT/build.log" 2>&1
    rm -rf "$site/llama_cpp/lib" && ln -s "$build/bin" "$site/llama_cpp/lib"
    python3 -m pytest -q -p no:cacheprovider tests/test_batching.py tests/test_offload.py \
        -k "gpu" 2>&1 | tee "$OUT/gpu_tests.log"
    wait "$standin"
    python3 tools/batch_bench.py --model "$(ls ~/.cache/edge-steer-standins/mistral-q4_k_m*.gguf)" \
        --gpu-layers all --threads 8 --tokens 64 --vector bench-random --random-vector \
        --shared-steering --baseline /tmp/before --cache /tmp/parity \
        --output batch_bench_gpu_h200.json 2>&1 | tee "$OUT/bench.log"
    cp tools/results/batch_bench_gpu_h200.json "$OUT/"
}

"$@"
