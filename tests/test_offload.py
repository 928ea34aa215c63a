"""MoE experts in CPU memory, GPU layers, the split planner and `doctor`, on real llama.cpp.

Where weights went is read from llama.cpp itself (its load log names every tensor it
overrode and the size of every weight buffer), never from our own patterns.
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import random_rows
from test_cli import assert_clean_error, run

from edge_steer import constants, engine, ggml, gguffile, machine, offload
from edge_steer.engine import Context, Model, hidden
from edge_steer.errors import BadInput

KINDS = ("gate", "up", "down")
PROMPTS = ["The quick brown fox jumps over", "Once upon a time", "Water boils at"]
HOST = re.compile(r"CPU(_\w+)?|\w+_Host")  # buffer types in system RAM (CUDA_Host is pinned RAM)


def file_tensors(path: Path) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}


def experts_of(blocks: range) -> set[str]:
    return {f"blk.{i}.ffn_{kind}_exps.weight" for i in blocks for kind in KINDS}


def load(path: Path, moe: str | None, gpu: str | None = "0") -> Model:
    plan = offload.plan_offload(
        offload.read_weights(gguffile.read_header(path)), gpu, moe, free=0, context=0
    )
    return Model(path, gpu_layers=plan.gpu_layers, cpu_tensors=plan.cpu_tensors)


# -- the overrides reach llama.cpp, for the experts and nothing else --------------------------


def test_the_tiny_moe_has_the_expert_tensors_we_expect(tiny_moe_path) -> None:
    names = file_tensors(tiny_moe_path)
    assert {n for n in names if "_exps" in n} == experts_of(range(6))


@pytest.mark.parametrize(("moe", "blocks"), [("all", range(6)), ("2", range(2)), ("6", range(6))])
def test_expert_tensors_and_only_they_go_to_the_cpu(tiny_moe_path, moe, blocks) -> None:
    with load(tiny_moe_path, moe, gpu="all") as model:
        overridden = model.overridden  # parsed from llama.cpp's own load log
    assert set(overridden) == experts_of(blocks)
    assert all(HOST.fullmatch(buft) for buft in overridden.values()), overridden


def test_no_overrides_without_the_option(tiny_moe_path) -> None:
    for moe in (None, "none", "0", "auto"):
        with load(tiny_moe_path, moe, gpu="all") as model:
            assert model.overridden == {}
            assert any("model buffer size" in line for line in model.load_log)


def test_ggml_is_bound_to_the_libraries_libllama_uses() -> None:
    """Wheels ship copies (libggml-base.so, .so.0, ...): binding another copy would give a
    second device registry and a CPU buffer type that llama.cpp does not recognise."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    ggml.cpu_buffer_type()
    ggml.devices()
    mapped = set(
        re.findall(r"\S*/lib(?:ggml[\w-]*|llama)\.so\S*", Path("/proc/self/maps").read_text())
    )
    stems = collections.Counter(Path(p).name.split(".so")[0] for p in mapped)
    assert stems["libggml-base"] == stems["libggml"] == 1, mapped
    assert all(count == 1 for count in stems.values()), mapped


# -- same numbers with any split ---------------------------------------------------------------


def outputs(model: Model, rows: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray], str]:
    with Context(model, n_ctx=256, n_batch=256, n_seq=4, threads=1, capture=True) as ctx:
        ctx.set_steering(rows)
        captured = hidden.capture(ctx, [model.tokenize(p) for p in PROMPTS])
    with Context(model, n_ctx=256, threads=1) as ctx:
        ctx.set_steering(rows)
        ctx.ingest(model.tokenize(PROMPTS[0]))
        logits = ctx.logits()
        sampler = engine.Sampler(model, engine.SamplerSettings(temperature=0))
        text = "".join(ctx.generate(model.tokenize(PROMPTS[1]), sampler, max_tokens=12))
    return logits, captured, text


def test_outputs_and_hidden_states_are_identical_with_and_without_overrides(tiny_moe_path) -> None:
    with load(tiny_moe_path, None) as plain:
        rows = random_rows(plain, {2: 8.0, 4: 8.0})
        expected = [outputs(plain, None), outputs(plain, rows)]
    for moe in ("all", "3"):
        with load(tiny_moe_path, moe) as split:
            assert split.overridden  # the overrides did happen
            for want, got in zip(
                expected, [outputs(split, None), outputs(split, rows)], strict=True
            ):
                assert np.array_equal(want[0], got[0])  # logits, bit for bit
                assert all(np.array_equal(a, b) for a, b in zip(want[1], got[1], strict=True))
                assert want[2] == got[2]
    assert not np.array_equal(expected[0][0], expected[1][0])  # and the vector did something


# -- bad options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--moe-offload", "-1"], "--moe-offload -1: use none, all, auto or a number of layers"),
        (["--moe-offload", "7"], "--moe-offload 7: the model has 6 layers: use 0-6"),
        (["--moe-offload", "half"], "--moe-offload half: use none, all, auto"),
        (["--gpu-layers", "8"], "--gpu-layers 8: the model has 7 layers to offload"),
        (["--gpu-layers", "-3"], "--gpu-layers -3: use all, auto or a number of layers"),
    ],
)
def test_bad_offload_options_are_one_clean_line(tiny_moe_path, args, words) -> None:
    assert_clean_error(run("generate", "--model", str(tiny_moe_path), "-p", "hi", *args), words)


def test_moe_offload_on_a_dense_model_is_refused(tiny_dense_path) -> None:
    result = run("train", "x", "--model", str(tiny_dense_path), "--moe-offload", "all")
    assert_clean_error(result, "the model has no expert tensors")


# -- the planner -----------------------------------------------------------------------------


def gpu_bytes_by_hand(path: Path, moe_layers: int) -> int:
    """All layers on the GPU: everything but token embeddings and CPU-side experts."""
    total = 0
    for name, size in file_tensors(path).items():
        block = re.match(r"blk\.(\d+)\.", name)
        if name.startswith("token_embd."):
            continue
        if "_exps" in name and block and int(block[1]) < moe_layers:
            continue
        total += size
    return total


def test_auto_picks_the_n_the_arithmetic_says(tiny_moe_path) -> None:
    weights, context = offload.read_weights(gguffile.read_header(tiny_moe_path)), 12345
    for n in range(7):
        need = gpu_bytes_by_hand(tiny_moe_path, n) + context
        assert offload.plan_moe_offload(weights, need, context) == n
        if n < 6:
            assert offload.plan_moe_offload(weights, need - 1, context) == n + 1
        plan = offload.plan_offload(weights, None, None, free=need, context=context)
        assert (plan.gpu_layers, plan.moe_layers) == (7, n)
        assert plan.gpu_bytes == need - context
    too_small = gpu_bytes_by_hand(tiny_moe_path, 6) + context - 1
    assert offload.plan_moe_offload(weights, too_small, context) is None
    plan = offload.plan_offload(weights, None, None, free=too_small, context=context)
    assert plan.moe_layers == 6 and plan.gpu_layers < 7  # then fewer layers, experts on CPU


def test_auto_gpu_layers_count_from_the_top(tiny_moe_path) -> None:
    weights, tensors = (
        offload.read_weights(gguffile.read_header(tiny_moe_path)),
        file_tensors(tiny_moe_path),
    )
    output = tensors["output.weight"] + tensors["output_norm.weight"]
    block = [sum(s for n, s in tensors.items() if n.startswith(f"blk.{i}.")) for i in range(6)]
    for layers in range(1, 8):  # the output layer, then blocks 5, 4, ... (llama.cpp's order)
        need = output + sum(block[7 - layers :])
        assert offload.plan_gpu_layers(weights, need, 0) == layers
        assert offload.plan_gpu_layers(weights, need - 1, 0) == layers - 1
    assert offload.plan_gpu_layers(weights, output - 1, 0) == 0


def test_kv_cache_estimate_matches_llama_cpp(tiny_moe_path, monkeypatch) -> None:
    monkeypatch.setattr(engine.log, "LOG_TAIL", collections.deque(maxlen=100_000))
    with load(tiny_moe_path, None) as model, Context(model, n_ctx=2048, threads=1):
        line = next(x for x in engine.log.LOG_TAIL if re.match(r"llama_kv_cache: size = ", x))
    mib = float(re.search(r"size = +([\d.]+) MiB", line)[1])
    assert offload.read_weights(
        gguffile.read_header(tiny_moe_path)
    ).kv_per_token * 2048 == pytest.approx(mib * 2**20, abs=0.01 * 2**20)


def test_cpu_only_auto_says_there_is_nothing_to_offload(tiny_moe_path) -> None:
    weights = offload.read_weights(gguffile.read_header(tiny_moe_path))
    plan = offload.plan_offload(weights, "auto", "auto", free=0, context=0)
    assert (plan.gpu_layers, plan.moe_layers, plan.cpu_tensors) == (0, 0, ())
    assert any("moe-offload auto: no GPU found" in note for note in plan.notes)
    quiet = offload.plan_offload(weights, None, None, free=0, context=0)
    assert quiet.notes == () and quiet.cpu_tensors == ()


def test_cli_auto_with_a_simulated_budget(tiny_moe_path, monkeypatch) -> None:
    weights, n_ctx = offload.read_weights(gguffile.read_header(tiny_moe_path)), 64
    budget = gpu_bytes_by_hand(tiny_moe_path, 4) + weights.context(n_ctx)
    monkeypatch.setenv(constants.VRAM_ENV, str(budget))
    monkeypatch.setenv("EDGE_STEER_VERBOSE", "1")  # llama.cpp's log on stderr
    result = run(
        *f"generate --model {tiny_moe_path} -p hi -n 2 --ctx {n_ctx} --moe-offload auto".split()
    )
    assert result.returncode == 0, result.stderr
    assert "moe-offload auto: experts of the first 4 of 6 layers on CPU" in result.stderr
    overridden = re.findall(r"tensor (\S+) \(.*\) buffer type overridden", result.stderr)
    assert set(overridden) == experts_of(range(4))


def test_sizes_and_options_parse() -> None:
    assert machine.parse_size("10GiB", "X") == 10 << 30
    assert machine.parse_size("512M", "X") == 512 << 20
    assert machine.parse_size("1234", "X") == 1234
    with pytest.raises(BadInput, match="not a size"):
        machine.parse_size("lots", "X")
    assert offload.parse_gpu_layers("-1") == offload.parse_gpu_layers("ALL") == "all"
    assert offload.parse_moe_offload("none") == 0 and offload.parse_moe_offload("12") == 12


# -- doctor ---------------------------------------------------------------------------------------


def test_doctor_json_describes_this_build() -> None:
    result = run("doctor", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert "CPU" in info["build"]["backends"]
    cpu = [d for d in info["devices"] if d["kind"] == "cpu"]
    assert cpu and cpu[0]["total"] > 0
    assert info["ram"]["total"] == machine.total_ram() and info["cpu"]["cores"] >= 1
    if info["build"]["gpu_backends"]:
        assert info["gpu_build_command"] is None
    else:
        assert info["gpu_build_command"].startswith('CMAKE_ARGS="-DGGML_')
        assert info["vram_free"] == 0
        assert "CMAKE_ARGS=" in run("doctor").stdout


def _fake_sysfs(root: Path, siblings: dict[int, str], performance: str | None = None) -> Path:
    for cpu, twins in siblings.items():
        topology = root / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(twins + "\n")
    if performance is not None:
        (root / "cpu_core").mkdir()
        (root / "cpu_core" / "cpus").write_text(performance + "\n")
    return root


def test_default_threads_are_physical_performance_cores(tmp_path, monkeypatch) -> None:
    """llama.cpp's default: one thread per physical core, SMT twins and E-cores left out."""
    monkeypatch.setattr(machine, "_allowed_cpus", lambda: {0, 1, 2, 3, 4, 5})
    smt = {0: "0,3", 1: "1,4", 2: "2,5", 3: "0,3", 4: "1,4", 5: "2,5"}
    assert machine.math_cores(_fake_sysfs(tmp_path / "smt", smt)) == 3
    hybrid = {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3", 4: "4", 5: "5"}  # 2 P-cores, 2 E-cores
    assert machine.math_cores(_fake_sysfs(tmp_path / "hybrid", hybrid, "0-3")) == 2
    assert machine.math_cores(_fake_sysfs(tmp_path / "plain", {c: str(c) for c in smt})) == 6
    assert machine.math_cores(tmp_path / "missing") == machine.cpu_cores() == 6
    monkeypatch.setattr(machine, "_allowed_cpus", lambda: {0, 3})  # taskset to one core's twins
    assert machine.math_cores(tmp_path / "smt") == 1


def test_default_threads_on_this_machine() -> None:
    assert 1 <= machine.math_cores() <= machine.cpu_cores()
    assert json.loads(run("doctor", "--json").stdout)["cpu"]["threads"] == machine.math_cores()


def test_gpu_build_command_per_platform() -> None:
    assert "-DGGML_METAL=on" in machine.gpu_build_command("Darwin", "arm64")
    assert "-DGGML_CUDA=on" in machine.gpu_build_command("Linux", "x86_64")
    assert "llama-cpp-python==" in machine.gpu_build_command("Linux", "aarch64")


def test_model_fits() -> None:
    from edge_steer import catalog
    from edge_steer.doctor import model_fits

    gb = 10**9
    models = [catalog.lookup("mistral:q4_k_m"), catalog.lookup("mixtral:q4_k_m")]  # 5.4, 29.5 GB
    pi = model_fits(models, available_ram=8 * gb, vram_free=0)
    assert [m["runs_on"] for m in pi] == ["cpu", "no"]
    desktop = model_fits(models, available_ram=32 * gb, vram_free=12 * gb)
    assert [m["runs_on"] for m in desktop] == ["gpu", "gpu+cpu"]
    laptop = model_fits(models, available_ram=20 * gb, vram_free=12 * gb)
    assert [m["runs_on"] for m in laptop] == ["gpu", "gpu+cpu"]  # 29.5 <= 20 + 12
    small = model_fits(models, available_ram=12 * gb, vram_free=4 * gb)
    assert [m["runs_on"] for m in small] == ["gpu+cpu", "no"]


# -- on a GPU build (skipped on CPU-only machines) ----------------------------------------------

needs_gpu = pytest.mark.skipif(not machine.gpus(), reason="no GPU device in this llama.cpp build")


@needs_gpu
@pytest.mark.parametrize("moe", ["none", "all", "2"])
def test_gpu_buffers_hold_what_the_planner_says(tiny_moe_path, moe) -> None:
    weights = offload.read_weights(gguffile.read_header(tiny_moe_path))
    with load(tiny_moe_path, moe, gpu="all") as model:
        buffers = model.buffers
    on_gpu = {name: size for name, size in buffers.items() if not HOST.fullmatch(name)}
    assert len(on_gpu) == 1, buffers
    moe_layers = {"none": 0, "all": 6, "2": 2}[moe]
    expected = weights.on_gpu(7, moe_layers)
    assert abs(next(iter(on_gpu.values())) - expected) < 512 * 50, (buffers, expected)


@needs_gpu
def test_steering_on_the_gpu_with_experts_on_the_cpu(tiny_moe_path) -> None:
    with load(tiny_moe_path, None) as cpu:
        rows = random_rows(cpu, {3: 8.0})
        base, steered = outputs(cpu, None)[1], outputs(cpu, rows)[1]
    with load(tiny_moe_path, "all", gpu="all") as split:
        gbase, gsteered = outputs(split, None)[1], outputs(split, rows)[1]
    for a, b, c, d in zip(base, steered, gbase, gsteered, strict=True):
        scale = float(np.abs(a).max())
        assert np.allclose(a, c, atol=0.02 * scale) and np.allclose(b, d, atol=0.02 * scale)
        assert np.allclose(d[:, 3] - c[:, 3], rows[3], atol=0.02 * scale)


def test_plan_says_which_weights_stay_in_cpu_memory():
    # 3 of 5 layers offloaded: output, blocks 3 and 2; experts of blocks 0-2 kept on the CPU
    plan = offload.Offload(gpu_layers=3, moe_layers=3, cpu_tensors=(), gpu_bytes=1)
    on_cpu = {
        name: plan.on_cpu(name, n_layer=4)
        for name in (
            "token_embd.weight",
            "output.weight",
            "blk.1.attn_q.weight",
            "blk.2.attn_q.weight",
            "blk.2.ffn_up_exps.weight",
            "blk.3.ffn_up_exps.weight",
        )
    }
    assert on_cpu == {
        "token_embd.weight": True,
        "output.weight": False,
        "blk.1.attn_q.weight": True,
        "blk.2.attn_q.weight": False,
        "blk.2.ffn_up_exps.weight": True,
        "blk.3.ffn_up_exps.weight": False,
    }
    cpu_only = offload.Offload(gpu_layers=5, moe_layers=0, cpu_tensors=(), gpu_bytes=0)
    assert cpu_only.on_cpu("output.weight", n_layer=4)  # no GPU: everything stays
