"""Pulling models by name from a local server that speaks the Hub's download protocol.

Every test runs the real CLI in a subprocess with HF_ENDPOINT pointing at tests/local_hub.py and
HF_HOME in a temporary folder, so huggingface_hub downloads, resumes and caches for real and the
real Hub is never reached.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_steer import catalog, machine
from edge_steer.errors import BadInput, DamagedFile, DoesNotFit, NetworkError, NotFound
from tests.local_hub import COMMIT, LocalHub

REPO = "edge-steer/tiny-gguf"
SPEC = f"hf:{REPO}/tiny.gguf"


@pytest.fixture
def hub():
    server = LocalHub()
    yield server
    server.close()


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf"


@pytest.fixture
def env(hub: LocalHub, hf_home: Path, tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {
        **clean,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
        "EDGE_STEER_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }


@pytest.fixture(scope="module")
def tiny(tiny_dense_path: Path) -> bytes:
    return tiny_dense_path.read_bytes()


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_steer", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def assert_refused(result: subprocess.CompletedProcess, error: type, *words: str) -> None:
    """One error line with `words`, and the exit code of the error class it must be."""
    assert result.returncode == error.exit_code, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and all(w in last for w in words), result.stderr


def cached(hf_home: Path, file: str = "tiny.gguf", repo: str = REPO) -> Path:
    folder = "models--" + repo.replace("/", "--")
    return hf_home / "hub" / folder / "snapshots" / COMMIT / file


def generate(spec: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["generate", "--model", spec, "-p", "Hello", "-n", "4", "--temp", "0", "--threads", "1"]
    return run(*args, "--json", env=env)


def test_a_fresh_pull_works_end_to_end_and_the_model_loads(hub, env, hf_home, tiny) -> None:
    hub.add(REPO, "tiny.gguf", tiny)
    result = generate(SPEC, env)
    assert result.returncode == 0, result.stderr
    assert f"downloading {SPEC}" in result.stderr and " kB " in result.stderr  # message, bar
    bar = next(line for line in result.stderr.splitlines() if " kB " in line)
    assert bar.startswith("tiny.gguf") and "(…)" not in bar  # was the blob's hash
    assert json.loads(result.stdout)["generated_tokens"] > 0
    path = cached(hf_home)
    sha = hashlib.sha256(tiny).hexdigest()
    assert path.read_bytes() == tiny and path.resolve().name == sha  # huggingface_hub's cache
    assert len(hub.gets()) == 1

    again = run("pull", SPEC, env=env)
    assert again.returncode == 0 and again.stdout.strip() == str(path)
    assert "downloading" not in again.stderr and len(hub.gets()) == 1


def test_a_pull_cut_off_halfway_resumes_with_the_right_sha256(hub, env, tiny) -> None:
    # huggingface_hub writes 10 MiB chunks, so resuming needs a file bigger than one: the tiny
    # model plus 24 MiB of padding after its tensors (still a valid GGUF), cut off at 15 MiB.
    data = tiny + bytes(24 << 20)
    hub.add(REPO, "tiny.gguf", data, cut_at=15 << 20)
    result = run("pull", SPEC, env=env)
    assert result.returncode == 0, result.stderr
    (_, _, first), (_, _, second) = hub.gets()
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))
    assert first is None and 0 < resumed_at <= 15 << 20  # the second GET asks for the rest
    path = Path(result.stdout.strip())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()


def test_partial_downloads_of_killed_pulls_are_removed(hub, env, hf_home, tiny) -> None:
    """huggingface_hub deletes a process's partial file when it ends, but not after kill -9:
    each stayed for good (up to 28 GB for Mixtral). One no process writes to any more goes;
    one being written now (another pull's) stays."""
    hub.add(REPO, "tiny.gguf", tiny)
    blobs = cached(hf_home).parents[2] / "blobs"
    blobs.mkdir(parents=True)
    stale, live = blobs / "abc.0a1b2c3d.incomplete", blobs / "abc.4e5f6a7b.incomplete"
    stale.write_bytes(b"x" * 3_000_000)
    live.write_bytes(b"x" * 1000)
    os.utime(stale, (1, 1))
    result = run("pull", SPEC, env=env)
    assert result.returncode == 0, result.stderr
    assert "removed 3.0 MB of downloads an earlier pull left" in result.stderr
    assert not stale.exists() and live.exists()
    os.utime(live, (1, 1))  # its pull was killed and the file is cached now: pull and rm look
    assert run("pull", SPEC, env=env).returncode == 0 and not live.exists()
    live.write_bytes(b"x" * 1000)
    os.utime(live, (1, 1))
    assert run("models", "rm", SPEC, env=env).returncode == 0 and not live.exists()


def test_a_corrupted_download_is_detected_reported_and_never_loaded(hub, env, hf_home, tiny):
    hub.add(REPO, "tiny.gguf", tiny, corrupt=True)
    result = generate(SPEC, env)
    assert_refused(result, DamagedFile, "sha256", "corrupt", "deleted")
    assert result.stdout == ""  # nothing was generated
    blobs = cached(hf_home).parents[2] / "blobs"
    assert not cached(hf_home).exists() and not any(blobs.iterdir())


def test_a_file_that_is_not_a_gguf_is_deleted_not_kept_as_verified(hub, env, hf_home) -> None:
    """Its sha256 matched the Hub's, so it was kept as verified; every pull after said "not a
    GGUF file ... download it again" without downloading."""
    hub.add(REPO, "tiny.gguf", b"<html>not a model</html>" * 100)
    assert_refused(run("pull", SPEC, env=env), DamagedFile, "is not a GGUF file", "deleted")
    assert not cached(hf_home).exists()


def test_pinned_size_and_sha256_are_checked(hub, env, tiny) -> None:
    hub.add(REPO, "tiny.gguf", tiny)
    sha = hashlib.sha256(tiny).hexdigest()
    code = (
        "from edge_steer import download as d; "
        f"print(d.fetch(d.Source({REPO!r}, 'tiny.gguf', {COMMIT!r}, {len(tiny)}, {sha!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == tiny


@pytest.mark.parametrize(
    ("name", "words"),
    [("mistral:q4_k_m", ["sha256", "catalog pins"]), ("mistral:q8_0", ["bytes", "catalog pins"])],
)
def test_a_catalog_model_is_refused_if_the_hub_serves_another_file(hub, env, tiny, name, words):
    entry = catalog.lookup(name)
    hub.add(entry.repo, entry.file, tiny, revision=entry.revision)
    result = run("pull", name, "--force", env=env)  # --force: skip the RAM check of this machine
    assert_refused(result, DamagedFile, *words)
    assert hub.gets() == []


def test_an_unpinned_catalog_file_of_another_size_is_refused(hub, env, tiny) -> None:
    """From a sweep: a catalog file with no exact size took whatever the Hub served (a 0.6 MB
    file was "verified" as Mistral 7B Q5_K_M); its published size now bounds it."""
    entry = catalog.lookup("mistral:q5_k_m")
    assert not entry.size_exact
    hub.add(entry.repo, entry.file, tiny, revision=entry.revision)
    result = run("pull", "mistral:q5_k_m", "--force", env=env)
    assert_refused(result, DamagedFile, "where the catalog's mistral:q5_k_m is about 5.1 GB")
    assert hub.gets() == []


def test_offline_mode_uses_the_cache_and_makes_no_network_call(hub, env, tiny) -> None:
    hub.add(REPO, "tiny.gguf", tiny)
    assert run("pull", SPEC, env=env).returncode == 0
    seen = len(hub.requests)
    offline = run("pull", "--offline", SPEC, env=env)
    assert offline.returncode == 0, offline.stderr
    result = generate(SPEC, {**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert len(hub.requests) == seen


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["pull", "--offline", SPEC], {}),
        (["chat", "-p", "hi", "--force"], {"HF_HUB_OFFLINE": "1"}),  # the default model
    ],
)
def test_offline_with_nothing_cached_names_the_demo_model(hub, env, args, extra) -> None:
    result = run(*args, env={**env, **extra})
    assert_refused(result, NotFound, "not downloaded", "--model demo", "network on")
    assert "pip install" not in result.stderr  # the demo extra is installed here
    assert f"pull {SPEC}" not in result.stderr  # not the very command that just failed
    assert hub.requests == []


def test_insufficient_disk_gives_a_clear_refusal(hub, env, tiny) -> None:
    hub.add(REPO, "tiny.gguf", tiny, size=1 << 50)  # the Hub says 1.1 PB
    result = run("pull", SPEC, env=env)
    assert_refused(result, DoesNotFit, "needs 1125899.9 GB of disk", "free", "HF_HUB_CACHE")
    assert hub.gets() == []


def test_unknown_files_repos_and_an_unreachable_hub_are_clean_errors(hub, env, tiny) -> None:
    hub.add(REPO, "tiny.gguf", tiny)
    assert_refused(run("pull", f"hf:{REPO}/nope.gguf", env=env), NotFound, "nope.gguf not found")
    assert_refused(
        run("pull", "hf:someone/else/x.gguf", env=env), NotFound, "someone/else not found"
    )
    assert_refused(run("pull", "hf:just-a-name", env=env), BadInput, "use hf:OWNER/REPO/FILE")
    assert_refused(run("pull", f"hf:{REPO}/notes.txt", env=env), BadInput, "FILE.gguf")
    assert_refused(run("pull", "", env=env), BadInput, "no model named")  # was the default
    assert hub.gets() == []
    for spec in (f"hf:{REPO}/../../etc/passwd", f"hf:{REPO}/./tiny.gguf"):  # were tracebacks
        assert_refused(run("pull", spec, env=env), BadInput, "bad model spec")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nowhere = {**env, "HF_ENDPOINT": f"http://127.0.0.1:{s.getsockname()[1]}"}
    assert_refused(run("pull", SPEC, env=nowhere), NetworkError, "could not fetch", "--model demo")


def test_models_list_info_and_rm(hub, env, hf_home, tiny, demo_path) -> None:
    env = {**env, "EDGE_STEER_HOME": str(demo_path.parent.parent)}  # where the demo is assembled
    rows = json.loads(run("models", "list", "--json", env=env).stdout)
    assert [r["name"] for r in rows] == [catalog.short_name(e) for e in catalog.entries()]
    by_name = {r["name"]: r for r in rows}
    assert by_name["demo"]["downloaded"] and by_name["demo"]["path"] == str(demo_path)
    assert not by_name["mistral:q4_k_m"]["downloaded"]
    assert by_name["mistral:q4_k_m"]["ram_needed"] > by_name["mistral:q4_k_m"]["size"]

    shown = json.loads(run("models", "info", "mixtral:q3_k_m", "--json", env=env).stdout)
    assert shown["active_params_b"] == 12.9 and shown["size_exact"] is False

    hub.add(REPO, "tiny.gguf", tiny)
    assert run("pull", SPEC, env=env).returncode == 0
    pulled = json.loads(run("models", "info", SPEC, "--json", env=env).stdout)  # was refused
    assert pulled["size"] == len(tiny) and pulled["size_exact"] and pulled["downloaded"]
    assert pulled["sha256"] == hashlib.sha256(tiny).hexdigest()
    removed = run("models", "rm", SPEC, env=env)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert not cached(hf_home).exists() and not any(cached(hf_home).parents[2].glob("blobs/*"))
    assert "not downloaded" in run("models", "rm", SPEC, env=env).stderr


def test_a_model_too_big_for_this_machine_is_refused_before_any_download(hub, env) -> None:
    biggest = max(catalog.entries(), key=lambda e: e.ram_needed())
    if catalog.fit_problem(biggest, available_ram=machine.available_ram()) is None:
        pytest.skip(f"this machine has room for {biggest.name}")
    result = run("pull", catalog.short_name(biggest), env=env)
    assert_refused(result, DoesNotFit, "of RAM", "available", "would fit", "--force")
    assert hub.requests == []


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), DoesNotFit, "no space left"),
        (OSError(errno.EROFS, "Read-only file system"), BadInput, "point HF_HOME at a folder"),
        (PermissionError(errno.EACCES, "Permission denied"), BadInput, "cannot write the"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), NetworkError, "check the network"),
    ],
)
def test_a_full_or_read_only_cache_is_not_called_a_network_failure(error, expected, words):
    """The disk's errors reach the same handler as the network's (huggingface_hub raises
    both as OSError): a full disk said "check the network" with exit 1, where it is exit 3."""
    from edge_steer import download

    with pytest.raises(expected, match=words), download._hub_errors(download.source(SPEC)):
        raise error


def test_models_info_reads_a_local_file(env, tiny, tmp_path) -> None:
    """Was: 'unknown model', with advice to pass the very path given."""
    path = tmp_path / "mine.gguf"
    path.write_bytes(tiny)
    data = json.loads(run("models", "info", str(path), "--json", env=env).stdout)
    assert data["architecture"] == "llama" and data["size"] == path.stat().st_size
    assert data["blocks"] > 0 and data["n_embd"] > 0
    assert_refused(run("models", "info", str(tmp_path / "no.gguf"), env=env), NotFound, "no file")


def test_a_home_that_is_a_file_is_named(env, tmp_path) -> None:
    (tmp_path / "file").write_text("")
    result = run("vectors", "list", env={**env, "EDGE_STEER_HOME": str(tmp_path / "file")})
    assert_refused(result, BadInput, "EDGE_STEER_HOME=", "is not a folder")


def test_a_cut_short_demo_copy_is_not_downloaded_and_is_made_again(env, tmp_path) -> None:
    """Was: `models list` said downloaded, `pull` printed the path (rc 0), and every load
    failed on a truncated header."""
    copy = Path(run("pull", "demo-chat", "--offline", env=env).stdout.strip())
    whole = copy.stat().st_size
    with open(copy, "r+b") as file:
        file.truncate(1_000_000)
    rows = json.loads(run("models", "list", "--json", env=env).stdout)
    assert not next(r for r in rows if r["name"] == "demo-chat")["downloaded"]
    again = run("pull", "demo-chat", "--offline", env=env)
    assert again.returncode == 0 and Path(again.stdout.strip()) == copy
    assert copy.stat().st_size == whole


def test_an_hf_home_below_a_file_is_not_called_a_network_failure(hub, env, tiny, tmp_path):
    hub.add(REPO, "tiny.gguf", tiny)
    (tmp_path / "file").write_text("")
    result = run("pull", SPEC, env={**env, "HF_HOME": str(tmp_path / "file")})
    assert_refused(result, BadInput, "point HF_HOME at a folder")  # was "check the network"


def test_a_home_that_cannot_be_written_is_named(env) -> None:
    """Was: 'cannot write /proc/self/models/...: pass a path', where no path was given."""
    result = run("pull", "demo-chat", env={**env, "EDGE_STEER_HOME": "/proc/self/edge-steer"})
    assert_refused(result, BadInput, "point EDGE_STEER_HOME at a folder you can write to")


def test_models_rm_never_deletes_a_file_a_snapshot_links_out_to(hub, env, hf_home, tiny, tmp_path):
    """Was: `models rm` deleted whatever the snapshot's link led to, a user's own file."""
    hub.add(REPO, "tiny.gguf", tiny)
    assert run("pull", SPEC, env=env).returncode == 0
    own = tmp_path / "mine.gguf"
    own.write_bytes(tiny)
    cached(hf_home).unlink()
    cached(hf_home).symlink_to(own)
    assert run("models", "rm", SPEC, env=env).returncode == 0
    assert own.read_bytes() == tiny and not cached(hf_home).exists()


def test_a_cached_file_of_another_size_is_no_catalog_model(env, hf_home, tiny) -> None:
    """Was: a file another tool left in the shared cache under a catalog model's name passed
    as that model when the catalog knows only its rounded size (0.6 MB as a 5.1 GB Q5_K_M)."""
    entry = catalog.lookup("mistral:q5_k_m")
    assert not entry.size_exact
    folder = hf_home / "hub" / ("models--" + entry.repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(tiny).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(tiny)
    snapshot = folder / "snapshots" / entry.revision / entry.file
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    rows = json.loads(run("models", "list", "--json", env=env).stdout)
    assert not next(r for r in rows if r["name"] == "mistral:q5_k_m")["downloaded"]
    result = run("pull", "mistral:q5_k_m", "--offline", env=env)
    assert_refused(result, DamagedFile, "about 5.1 GB", "deleted")
    assert not snapshot.exists()


@pytest.mark.parametrize("spec", ["hf:-/-/x.gguf", "hf: t/repo/x.gguf", "hf:a b/c/x.gguf"])
def test_repo_ids_the_hub_refuses_are_bad_specs(env, spec) -> None:
    """Were huggingface_hub's HFValidationError, with a traceback."""
    for command in (["pull", spec], ["models", "rm", spec], ["models", "info", spec]):
        assert_refused(run(*command, env=env), BadInput, "bad model spec", "hf:OWNER/REPO")


@pytest.mark.parametrize("records", ["[1, 2]", '{"BLOB": {"size": 1}}', "FOLDER"])
def test_verified_records_are_only_a_cache(hub, env, hf_home, tiny, records) -> None:
    """A records file of the wrong shape was a traceback, and one that cannot be written
    refused an intact model: it now costs a hash, with a note."""
    hub.add(REPO, "tiny.gguf", tiny)
    assert run("pull", SPEC, env=env).returncode == 0
    path = Path(env["EDGE_STEER_HOME"]) / "models" / "verified.json"
    if records == "FOLDER":
        path.unlink()
        path.mkdir()
    else:
        path.write_text(records.replace("BLOB", str(cached(hf_home).resolve())))
    result = run("pull", SPEC, env=env)
    assert result.returncode == 0 and result.stdout.strip() == str(cached(hf_home)), result.stderr
    assert "Traceback" not in result.stderr
    assert ("hashed again next time" in result.stderr) == (records == "FOLDER")


def test_a_quiet_download_that_still_holds_its_lock_is_left_alone(hub, env, hf_home, tiny):
    """A download that is slow or suspended (Ctrl-Z) writes nothing for minutes: its age
    made it look dead to another pull, which deleted it under the running download."""
    import fcntl

    hub.add(REPO, "tiny.gguf", tiny)
    folder = cached(hf_home).parents[2]
    partial = folder / "blobs" / "abc.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)
    os.utime(partial, (1, 1))
    lock = hf_home / "hub" / ".locks" / folder.name / "abc.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as huggingface_hub holds it while it downloads
        assert run("pull", SPEC, env=env).returncode == 0
        assert partial.exists()
    assert run("pull", SPEC, env=env).returncode == 0 and not partial.exists()


@pytest.mark.parametrize(("status", "words"), [(401, "HF_TOKEN"), (403, "HF_TOKEN"), (429, "wait")])
def test_a_bare_http_refusal_names_the_fix(hub, env, tiny, status, words) -> None:
    hub.add(REPO, "tiny.gguf", tiny, status=status)
    assert_refused(run("pull", SPEC, env=env), NetworkError, f"HTTP {status}", words)
