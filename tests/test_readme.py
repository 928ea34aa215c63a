"""The README's commands as a new user runs them: copied out of README.md, run by bash in a
fresh HOME with the network unreachable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port: any download fails fast


def code_block(heading: str, language: str) -> str:
    """The first ```language block after `heading` in README.md."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {language} block under {heading!r}"
    return match.group(1)


def offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_STEER_", "HF_"))}
    bin_dir = str(Path(sys.executable).parent)  # where pip put the edge-steer script
    return env | {
        "HOME": str(home),
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "HF_ENDPOINT": DEAD,
        "HTTP_PROXY": DEAD,
        "HTTPS_PROXY": DEAD,
        "http_proxy": DEAD,
        "https_proxy": DEAD,
        "COLUMNS": "200",
    }


def run_offline(command: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=600, env=offline_env(home), cwd=home
    )


def test_quick_start_runs_as_written_offline(tmp_path) -> None:
    script = code_block("## Quick start (offline)", "bash")
    assert "edge-steer" in script
    chats = [line for line in script.splitlines() if line.startswith("edge-steer chat ")]
    assert any("--model demo-chat" in line and " -p " in line for line in chats), script
    result = run_offline(["bash", "-euo", "pipefail", "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    outputs = [block for block in result.stdout.split("\n") if block.strip()]
    assert len(outputs) >= 3, result.stdout  # one continuation per command at least


def test_python_api_example_runs_as_written(tmp_path) -> None:
    script = code_block("## Python API", "python")
    assert len(script.strip().splitlines()) < 10
    result = run_offline([sys.executable, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), result.stderr[-3000:]


def test_install_says_how_it_really_installs() -> None:
    """Not on PyPI yet: the first commands install from the checkout, and the test command
    that CI runs (.ci/run) is the one the README gives."""
    text = README.read_text()
    install = text[text.index("\n## Install\n") : text.index("\n## Quick start (offline)\n")]
    assert "not on PyPI yet" in install
    assert 'pip install ".[demo]"' in code_block("## Install", "bash")
    assert 'pip install "edge-steer[demo]"' in install  # what will work once it is published
    assert "python -m pytest -q" in text
    assert len(text.splitlines()) < 250


def _anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    headings = re.findall(r"^#+\s+(.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_in_the_readme_and_docs_resolve() -> None:
    """Every relative link in README.md and docs/*.md names a file that exists, and a
    #section that its Markdown file has."""
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text()):
                broken.append(f"{page.name}: {target} (no such section)")
    assert not broken, broken


def test_the_readme_lists_every_docs_page() -> None:
    text = README.read_text()
    pages = sorted((README.parent / "docs").glob("*.md"))
    missing = [page.name for page in pages if f"(docs/{page.name})" not in text]
    assert not missing, missing
