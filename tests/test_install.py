"""Install as a newcomer does: the package built as a wheel, installed into a fresh virtual
environment, and the README's quick start run from it, offline, in a fresh HOME.

The wheel is what pip would fetch from PyPI; what it holds (package data: concepts, the
model catalog, the playground page; the `edge-steer` script) is what this checks. Its
dependencies come from this environment (llama-cpp-python takes minutes to compile), through
a path file, so nothing is downloaded."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from test_readme import code_block, offline_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_installs_and_runs_the_quick_start(tmp_path) -> None:
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("edge_steer-*.whl")
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    subprocess.run([*install, "--no-deps", "--no-index", str(wheel)], check=True, timeout=300)
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    home = tmp_path / "home"
    home.mkdir()
    env = offline_env(home)
    env["PATH"] = f"{fresh / 'bin'}:{env['PATH']}"  # the wheel's `edge-steer` comes first
    where = subprocess.run(
        [fresh / "bin" / "edge-steer", "--version"], capture_output=True, text=True, env=env
    )
    assert where.returncode == 0 and where.stdout.startswith("edge-steer "), where.stderr
    located = subprocess.run(
        [python, "-c", "import edge_steer; print(edge_steer.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
    )
    assert located.stdout.startswith(site), located  # the wheel's copy, not this checkout
    script = code_block("## Quick start (offline)", "bash")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stdout.strip()
