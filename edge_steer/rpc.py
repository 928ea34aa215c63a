"""llama.cpp's RPC backend: one model across several machines.

`edge-steer worker` serves this machine's devices (`serve`, in a child process because the C
server never returns); `--rpc HOST:PORT,...` lends the workers' devices to a model loading
here (`connect`), and llama.cpp then places layers on them as it would on GPUs. We write no
distribution layer of our own. Checks run in Python before llama.cpp is asked anything,
because llama.cpp aborts the whole process when a worker does not answer.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import worker_cache
from .constants import RPC_ENV, env
from .errors import BadInput, EngineError, NetworkError

DEFAULT_PORT = 50052
PROBE_TIMEOUT = 3.0  # seconds for the TCP connect and for the worker's HELLO reply
_HELLO = 14  # RPC_CMD_HELLO, fixed in every protocol version
_CAPS = 24  # RPC_CONN_CAPS_SIZE: the HELLO request is these bytes, zero = plain TCP
_HELLO_REPLY = 4 + _CAPS  # major, minor, patch, padding, capabilities

SECURITY_WARNING = (
    "an RPC worker has no authentication and no encryption: anyone who can reach this port "
    "can run code on this machine and read what it computes. Bind it only on a network you "
    "trust, behind a firewall or a WireGuard tunnel."
)


class WorkerBusy(NetworkError):
    """The worker accepted the connection but did not answer: it serves another client."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def rebuild_command() -> str:
    """The pip line that rebuilds llama-cpp-python with the RPC backend (RDMA off, so the
    build works on machines without InfiniBand/RoCE libraries)."""
    return (
        'CMAKE_ARGS="-DGGML_RPC=on -DGGML_RPC_RDMA=off" pip install --force-reinstall '
        "--no-cache-dir --no-binary llama-cpp-python "
        f"llama-cpp-python=={metadata.version('llama-cpp-python')}"
    )


def supported() -> bool:
    """Whether the installed llama.cpp build has the RPC backend."""
    from . import ggml

    return ggml.has_rpc()


def require_rpc() -> None:
    if not supported():
        raise BadInput(
            f"this llama-cpp-python build has no RPC backend: rebuild it with {rebuild_command()}"
        )


HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")  # a name or IPv4 address


def parse_endpoints(given: str | Sequence[str] | None) -> list[Endpoint]:
    """'host:port,host:port' (or a list of them) -> endpoints; None reads $EDGE_STEER_RPC."""
    source = "--rpc" if given is not None else f"${RPC_ENV}"  # the one to mend
    if given is None:
        given = env(RPC_ENV)
    items = given.split(",") if isinstance(given, str) else [p for g in given for p in g.split(",")]
    if (any(items) or len(items) > 1) and not any(i.strip() for i in items):  # " " and ","
        raise BadInput(f"{source} is blank: name the workers as HOST:PORT, or leave {source} out")
    found: list[Endpoint] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not HOST.fullmatch(host) or not port.isdigit():
            raise BadInput(
                f"{source} {item!r}: write HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT}), "
                "comma-separated for several workers; IPv6 addresses are not supported"
            )
        if not 0 < int(port) < 65536:
            raise BadInput(f"{source} {item!r}: port {int(port)} is out of range: use 1-65535")
        endpoint = Endpoint(host, int(port))
        if endpoint not in found:
            found.append(endpoint)
    return found


def hello(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT) -> tuple[int, int, int]:
    """Connect and exchange the RPC HELLO: the worker's protocol version (major, minor,
    patch). Raises NetworkError when it cannot be reached or does not answer in time."""
    try:
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise NetworkError(
            f"RPC worker {endpoint} is unreachable ({reason}): start it there with "
            f"`edge-steer worker --port {endpoint.port}` or fix --rpc/${RPC_ENV}"
        ) from None
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _HELLO, _CAPS) + bytes(_CAPS))
            size = struct.unpack("<Q", _receive(sock, 8))[0]
            reply = _receive(sock, size) if size == _HELLO_REPLY else b""
        except (OSError, EOFError):
            raise WorkerBusy(
                f"RPC worker {endpoint} accepted the connection but did not answer within "
                f"{timeout:g} s: is it an `edge-steer worker`, and is another client using it? "
                "(a worker serves one client at a time)"
            ) from None
    if not reply:
        raise BadInput(
            f"RPC worker {endpoint} speaks another RPC protocol (its HELLO reply has "
            f"{size} bytes): install the same llama-cpp-python version on the worker and here"
        )
    return reply[0], reply[1], reply[2]


def _receive(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def check_protocol(endpoint: Endpoint, version: tuple[int, int, int]) -> None:
    """llama.cpp's rule: the same major version, and no newer minor one on the worker."""
    from . import ggml

    installed = metadata.version("llama-cpp-python")
    ours = ggml.RPC_PROTOCOL.get(installed)
    if ours is None:
        return  # an untested version: llama.cpp checks it again when it connects
    if version[0] != ours[0] or version[1] > ours[1]:
        raise BadInput(
            f"RPC worker {endpoint} speaks protocol v{'.'.join(map(str, version))} but this "
            f"llama-cpp-python {installed} speaks v{ours[0]}.{ours[1]}: install the same "
            "llama-cpp-python version on the worker and here"
        )


def connect(given: str | Sequence[str] | None, timeout: float = PROBE_TIMEOUT) -> list[Endpoint]:
    """Check that every worker answers with a matching protocol, then register its devices
    with llama.cpp (once per endpoint and process). Returns the endpoints; none given, none
    done.

    A worker registered earlier is asked again (it may have stopped since), but its silence
    is taken for this process's own live connection: a worker serves one client at a time."""
    endpoints = parse_endpoints(given)
    if not endpoints:
        return []
    require_rpc()
    _check_distinct(endpoints)
    from . import ggml

    for endpoint in endpoints:
        known = str(endpoint) in ggml.RPC_SERVERS
        try:
            check_protocol(endpoint, hello(endpoint, min(timeout, 1.0) if known else timeout))
        except WorkerBusy:
            if not known:
                raise
    _install_abort_hook(endpoints)
    for endpoint in endpoints:
        if not ggml.rpc_add_server(str(endpoint)):
            raise BadInput(f"RPC worker {endpoint} offers no device: start it with --device")
    return endpoints


def _check_distinct(endpoints: list[Endpoint]) -> None:
    """Two names for one worker (127.0.0.1 and localhost): llama.cpp would open a second
    connection, which the worker (one client at a time) never serves, and hang."""
    seen: dict[tuple[str, int], Endpoint] = {}
    for endpoint in endpoints:
        try:
            found = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # `hello` says it is unreachable
        for *_, address in found:
            where = (str(address[0]), endpoint.port)
            first = seen.setdefault(where, endpoint)
            if first != endpoint:
                raise BadInput(
                    f"RPC workers {first} and {endpoint} are one worker ({where[0]}:"
                    f"{where[1]}): name it once"
                )


def _on_abort(message: bytes | None) -> None:
    """ggml is about to abort the process (a worker died mid-run, or its handshake failed):
    say so in one line and exit with an error code instead of a core dump."""
    text = (message or b"").decode(errors="replace").strip().rpartition(": ")[2]
    if "RPC" in text or "connect" in text:
        sys.stderr.write(
            f"error: lost an RPC worker ({', '.join(_watched)}): llama.cpp says {text!r}; the "
            "worker stopped or the network dropped: restart `edge-steer worker` there and run "
            "again\n"
        )
    else:
        sys.stderr.write(f"error: llama.cpp aborted: {text}\n")
    sys.stderr.flush()
    os._exit(1)


_watched: list[str] = []
_abort_hook: object = None  # the ctypes callback, referenced while ggml may call it


def _install_abort_hook(endpoints: Sequence[Endpoint]) -> None:
    global _abort_hook
    from . import ggml

    _watched[:] = sorted(set(_watched) | {str(e) for e in endpoints})
    if _abort_hook is None:
        _abort_hook = ggml.ABORT_CALLBACK_T(_on_abort)
        ggml.set_abort_callback(_abort_hook)


# -- the worker side ---------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, port: int, allow_remote: bool) -> None:
    """Refuse a host that is not an IP address (llama.cpp's RPC server takes no names), a
    non-loopback bind without the opt-in, and a port already taken."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise BadInput(
            f"--host {host}: the RPC server takes an IP address (v4), e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    if not is_loopback(host) and not allow_remote:
        raise BadInput(
            f"--host {host} exposes the worker beyond this machine, where {SECURITY_WARNING} "
            "Pass --allow-remote to do it anyway, or keep --host 127.0.0.1"
        )
    from . import machine

    machine.check_can_listen(host, port)


def serving_devices(names: Sequence[str]) -> list[str]:
    """The devices a worker serves: those named, else every GPU, else the CPU (as llama.cpp's
    rpc-server chooses)."""
    from . import machine

    known = [d for d in machine.devices(rpc=()) if not machine.is_rpc(d.name)]
    if not names:
        gpus = [d.name for d in known if d.kind in ("gpu", "igpu")]
        return gpus or [d.name for d in known if d.kind == "cpu"][:1]
    by_name = {d.name.lower(): d.name for d in known}
    missing = [n for n in names if n.lower() not in by_name]
    if missing:
        raise BadInput(
            f"--device {missing[0]}: no such device here; use one of {', '.join(by_name.values())}"
        )
    return list(dict.fromkeys(by_name[n.lower()] for n in names))  # "cpu,CPU" is one device


def serve(endpoint: str, cache_dir: str | None, threads: int, devices: Sequence[str]) -> None:
    """The worker child process: serve until killed. SIGINT gets its default action again,
    since Python's handler would never run while the C server loops."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent()
    from . import ggml

    ggml.rpc_start_server(endpoint, cache_dir, threads, list(devices))
    sys.stdout.flush()
    sys.exit(1)  # start_server returns only when it could not start


def run_worker(
    host: str,
    port: int,
    *,
    threads: int,
    devices: Sequence[str] = (),
    cache_dir: str | None = None,
    allow_remote: bool = False,
    on_note: Callable[[str], None] = lambda _: None,
) -> int:
    """Serve this machine's devices on host:port until Ctrl-C or the child ends; returns an
    exit code. The server runs in a child process so that the parent can stop it cleanly."""
    import multiprocessing

    from . import machine

    check_bind(host, port, allow_remote)
    require_rpc()
    names = serving_devices(devices)
    machine.check_thread_count(threads)  # was accepted up to any number
    if cache_dir:
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as exc:
            reason = "not a folder" if os.path.exists(cache_dir) else exc.strerror
            fix = "pass a folder you can write to"
            raise BadInput(f"--cache {cache_dir}: {reason}; {fix}") from None
        worker_cache.open_session(Path(cache_dir))
    on_note(f"worker on {host}:{port}: {', '.join(names)}, {threads} threads; Ctrl-C stops it")
    child = multiprocessing.get_context("spawn").Process(
        target=serve, args=(f"{host}:{port}", cache_dir, threads, names), daemon=True
    )
    child.start()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the child too
    previous_int = signal.signal(signal.SIGINT, _interrupt)  # even if started with it ignored
    try:
        child.join()
    except KeyboardInterrupt:
        on_note("worker stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if child.is_alive():
            child.terminate()
            child.join(5)
        if cache_dir:
            worker_cache.close_session(Path(cache_dir))
    if child.exitcode != 0:
        raise EngineError(
            f"the RPC server on {host}:{port} stopped (exit {child.exitcode}): see its output above"
        )
    return 0


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _die_with_parent() -> None:
    """Linux: end this child when the worker command ends, even by SIGKILL."""
    import contextlib
    import ctypes

    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
