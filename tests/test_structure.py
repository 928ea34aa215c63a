"""The shape of the code: no import cycles, command modules that do not import each other, a
command line that starts without llama.cpp, and llama.cpp loaded before numpy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "edge_steer"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """edge_steer modules that `path` imports anywhere in it (top level or in a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else node.module or base
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_edge_steer() -> None:
    edges = graph()
    assert len(edges) > 20 and edges["edge_steer.runtime"]  # the graph is really read
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle or [])


def test_command_modules_never_import_each_other() -> None:
    edges = graph()
    commands = {
        m
        for m in edges
        if m.startswith("edge_steer.cli.")
        and "register" in (PACKAGE / "cli" / f"{m.rpartition('.')[2]}.py").read_text()
    }
    assert {"edge_steer.cli.generate", "edge_steer.cli.vectors"} <= commands
    for module in commands:
        assert not edges[module] & commands, (module, edges[module] & commands)


FRONT_ENDS = {
    "cli": "edge_steer.cli",
    "server": "edge_steer.server",
    "llm": "edge_steer.llm_plugin",
}


def test_front_ends_share_only_the_library() -> None:
    """The CLI, the server and the llm plugin are front ends over the library: none imports
    another's modules, except that `edge-steer serve` starts the server (cli.serve ->
    server.startup), and nothing in the library imports a front end (`python -m edge_steer`
    is the CLI's own entry)."""
    edges = graph()
    allowed = {
        ("edge_steer.cli.serve", "edge_steer.server.startup"),
        ("edge_steer.__main__", "edge_steer.cli"),
    }

    def front_end(module: str) -> str | None:
        return next((n for n, p in FRONT_ENDS.items() if module.startswith(p)), None)

    crossings = [
        (module, target)
        for module, targets in edges.items()
        for target in targets
        if front_end(target)
        and front_end(target) != front_end(module)
        and (module, target) not in allowed
    ]
    assert not crossings, crossings


def loaded_modules(*args: str) -> list[str]:
    """sys.modules, in the order imports started, after running the CLI with `args`."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['edge-steer', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('edge_steer', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('\\n'.join(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["vectors", "list"], ["chat", "--help"]]
)
def test_the_cli_starts_without_llama_cpp(args, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_STEER_HOME", str(tmp_path))
    modules = loaded_modules(*args)
    assert "edge_steer.cli" in modules
    assert "llama_cpp" not in modules and "edge_steer.engine" not in modules


def test_loading_a_model_loads_llama_cpp_before_numpy(tiny_dense_path) -> None:
    """A CUDA build of llama-cpp-python segfaulted when numpy's libraries came first."""
    modules = loaded_modules("generate", "--model", str(tiny_dense_path), "-p", "Hi", "-n", "1")
    assert "edge_steer.engine" in modules
    assert modules.index("llama_cpp.llama_cpp") < modules.index("numpy")


def test_every_public_name_keeps_its_meaning_once_the_library_is_loaded() -> None:
    """A submodule named like a public function would replace it on the package as soon as
    it is imported (`edge_steer.train` became the module after `load`)."""
    code = """
import importlib, types
import edge_steer
for module in ("runtime", "bench", "library", "cli.evaluate", "server.app"):
    importlib.import_module(f"edge_steer.{module}")
modules = [n for n in edge_steer.__all__ if isinstance(getattr(edge_steer, n), types.ModuleType)]
assert not modules, modules
assert edge_steer.train.__module__ == "edge_steer.training"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_ci_type_checks_the_package() -> None:
    """The package ships py.typed, so its annotations are a promise: CI checks them."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmypy edge_steer\n" in ci and (ROOT / "edge_steer" / "py.typed").exists()


def metadata_keys_spelled(path: Path) -> list[str]:
    """String keys used on a vector's metadata in `path`: `x.metadata["k"]`, `.get("k")`,
    `.update(k=...)`, the same on a variable named `meta`, and `{"k": ...}` literals whose
    keys are all metadata keys."""
    from edge_steer.vectors import Key

    known = {value for name, value in vars(Key).items() if name.isupper()}

    def is_metadata(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "metadata") or (
            isinstance(node, ast.Name) and node.id in ("meta", "metadata")
        )

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        keys: list[ast.AST] = []
        if isinstance(node, ast.Subscript) and is_metadata(node.value):
            keys = [node.slice]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_metadata(node.func.value) and node.func.attr in ("get", "update", "pop"):
                keys = node.args[:1]
                found += [k.arg for k in node.keywords if k.arg in known]
        elif isinstance(node, ast.Dict) and node.keys:
            strings = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            if len(strings) == len(node.keys) and set(strings) <= known:
                keys = [k for k in node.keys if k is not None]
        found += [k.value for k in keys if isinstance(k, ast.Constant) and k.value in known]
    return found


def test_only_the_vectors_module_spells_metadata_keys() -> None:
    """Metadata keys are `vectors.Key` attributes everywhere else: a typo fails at once."""
    spelled = {
        str(path.relative_to(ROOT)): keys
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "vectors.py" and (keys := metadata_keys_spelled(path))
    }
    assert not spelled, spelled
    assert metadata_keys_spelled(Path(__file__).parent / "data" / "spelled_keys.py.txt")


def test_environment_variables_are_named_and_read_in_constants_only() -> None:
    """One place says which variables edge-steer reads (as huggingface_hub's constants.py)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "constants.py":
            continue
        text = path.read_text()
        if "os.environ" in text or "getenv(" in text or '"EDGE_STEER_' in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


def test_every_subpackage_ships_in_the_wheel() -> None:
    """setuptools lists packages by hand here (the catalog folder is mapped in): a new
    subpackage missing from the list would be left out of the wheel, and only a wheel
    install would notice."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, found - listed


def test_the_layout_in_the_docs_names_every_module() -> None:
    """docs/development.md has one line per room: a module added, moved or renamed must show
    up there too."""
    text = (ROOT / "docs" / "development.md").read_text()
    layout = text[text.index("edge_steer/\n") : text.index("```", text.index("edge_steer/\n"))]
    described = set()
    folder: list[str] = []
    for line in layout.splitlines():
        name = line.strip().split(" ")[0]
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            folder = [*folder[: depth - 1], name.rstrip("/")] if depth else []
        elif name.endswith((".py", ".html")):
            described.add("/".join([*folder[: depth - 1], name]))
    shipped = {
        str(p.relative_to(PACKAGE))
        for p in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.html")]
        if "concepts" not in p.parts and "__pycache__" not in p.parts
    }
    assert shipped - described == set(), "modules missing from the layout"
    assert described - shipped == set(), "the layout names modules that do not exist"
