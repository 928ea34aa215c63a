"""Start the server: listen at once, load the model behind /health's 503, then serve.

The model file is resolved (and downloaded) before the port opens, so that a wrong --model is
a one-line error at the terminal. Loading, presets and lanes happen on a loader thread while
uvicorn already answers /health; if loading fails, the server stops and the error is raised.

On SIGTERM or Ctrl-C the server admits nothing new (503), answers every open request
"the server is shutting down" (a stream gets an error event and [DONE], a waiting client a
503) once the engine thread has finished its step in progress, then gives the answers up to
GRACE_SECONDS to go out before uvicorn closes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from .. import files, ggml, library, machine, model_files, rpc, runtime, steering, store, vectors
from ..engine import DEFAULT_BATCH, MAX_SEQUENCES, Context, Model
from ..engine.batching import Batcher
from ..errors import BadInput, EdgeSteerError, EngineError
from .app import ServerState, create_app
from .guard import Admission, HeaderDeadline, allowed_hosts
from .lanes import Lanes
from .pool import VectorPool
from .requests import Served, spec_strengths

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACE_SECONDS = 3  # for answers to go out on shutdown


@dataclass
class ServeOptions:
    load: runtime.LoadOptions  # its model: the resolved file; its ctx: each lane's
    model_id: str  # the name clients use, e.g. "demo" or "mistral:q4_k_m"
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 1
    layers: str | None = None
    presets: dict[str, dict[str, float]] = field(default_factory=dict)
    allow_train: bool = False
    api_key: str | None = None
    queue_size: int = 32
    allow_hosts: list[str] = field(default_factory=list)  # Host names besides loopback's
    repack: bool | None = None  # llama.cpp's repacked CPU layouts; None: with one lane only

    @property
    def path(self) -> Path:
        return Path(self.load.model or "")

    @property
    def repacked(self) -> bool:
        """Whether the weights take llama.cpp's repacked layouts: as asked, else with one
        lane only (lanes decoded together need kernels that treat each row alike)."""
        return self.parallel == 1 if self.repack is None else self.repack

    @property
    def batch_invariant(self) -> bool:
        """Whether a reply is bit for bit the one it gets alone, whatever else runs: with one
        lane always; with more, when the weights keep llama.cpp's plain layouts."""
        return self.parallel == 1 or not self.repacked


# a Host header's name: a host name or IPv4 address as --rpc takes them, or an IPv6 address
ALLOWED_HOST = re.compile(rf"{rpc.HOST.pattern}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")
PRESET_NAME = store.NAME_PATTERN  # a model name clients can type, spelled as vector names are


def parse_presets(given: list[str]) -> dict[str, dict[str, float]]:
    """["calm=happy:0.5,lazy:1"] -> {"calm": {"happy": 0.5, "lazy": 1.0}}, each within the
    strength cap that every request's steering is held to."""
    presets: dict[str, dict[str, float]] = {}
    for item in given:
        name, sep, spec = item.partition("=")
        name = name.strip()
        if not sep or not PRESET_NAME.fullmatch(name) or not spec.strip():
            raise BadInput(
                f"bad preset {item[:80]!r}: use NAME=SPEC, NAME of letters, digits, '.', '_' "
                "or '-', e.g. --preset calm=happy:0.5"
            )
        if name in presets:
            raise BadInput(f"preset {name!r} is given twice: give each name once")
        presets[name] = {k: v for k, v in _preset_spec(item, spec).items() if v != 0}
        try:
            vectors.check_strengths(presets[name])
        except BadInput as exc:
            raise BadInput(f"preset {name!r}: {exc}") from None
    return presets


def _preset_spec(item: str, spec: str) -> dict[str, float]:
    try:
        return spec_strengths(spec, "preset")
    except EdgeSteerError:
        raise BadInput(
            f"bad preset {item!r}: its SPEC must be NAME[:STRENGTH],... e.g. happy:0.5,lazy:-1"
        ) from None


def check_counts(parallel: int, queue_size: int, port: int) -> None:
    """The numbers, before a model is resolved (a 1000-lane context would be refused for
    its RAM, with advice about --ctx)."""
    if not 1 <= parallel <= MAX_SEQUENCES:
        raise BadInput(f"--parallel {parallel} is out of range: use 1 to {MAX_SEQUENCES}")
    if queue_size < 0:
        raise BadInput(f"--queue {queue_size} is out of range: use 0 or more")
    machine.check_port(port)


def check_access(host: str, key: str | None, allow_hosts: list[str]) -> None:
    """--host, --api-key and --allow-host: values that would open the server to everyone,
    or lock out every client, are refused."""
    if not host.strip():
        raise BadInput("--host is empty (that listens on every interface): pass an address")
    if key is not None and not (key and key.isascii() and key.isprintable() and key == key.strip()):
        raise BadInput(
            "--api-key must be printable ASCII with no spaces around it (clients send it in a "
            "header; an empty one would switch checking off): pass another key"
        )
    for name in allow_hosts:
        if name != "*" and not ALLOWED_HOST.fullmatch(name.strip("[]")):
            raise BadInput(
                f"--allow-host {name[:80]!r} is not a host name: give the name as clients send "
                "it in Host, without scheme, port or path (e.g. --allow-host proxy.example), "
                "or * for any"
            )


def check_options(options: ServeOptions, on_note: Callable[[str], None]) -> None:
    """What can be wrong before anything loads: counts, the port, and what the model file's
    header can settle (--layers, presets' vectors), so that nothing says "listening" first."""
    options.load.check()
    check_counts(options.parallel, options.queue_size, options.port)
    check_access(options.host, options.api_key, options.allow_hosts)
    if options.model_id in options.presets:
        raise BadInput(
            f"preset {options.model_id!r} has the model's own name, which clients use for it "
            "unsteered: name the preset otherwise"
        )
    _check_against_model(options)
    if options.host not in LOOPBACK and not options.api_key:
        on_note(
            f"warning: --host {options.host} without --api-key: anyone who can reach port "
            f"{options.port} can use this model; pass --api-key KEY or use a firewall"
        )
    machine.check_can_listen(options.host, options.port)


def _check_against_model(options: ServeOptions) -> None:
    """--layers against the model's blocks; each preset's vector a file, a stored vector or
    a built-in concept (trained once loaded)."""
    layers = steering.parse_layers(options.layers, model_files.model_shape(options.path).n_layer)
    for preset, spec in options.presets.items():
        for name in spec:
            if not library.is_builtin(name):
                path: Path | None = store.resolve_vector(name, options.path)
            else:  # trained once loaded, unless stored already
                path = store.stored_vector(name, options.path)
            if path is not None:
                _check_preset_layers(preset, layers, name, vectors.read(path))


def serve(
    options: ServeOptions,
    *,
    on_note: Callable[[str], None],
    on_progress: runtime.Progress,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Run until Ctrl-C or SIGTERM; raise the loading error, if loading failed."""
    check_options(options, on_note)
    state = ServerState(api_key=options.api_key)
    holder: dict[str, uvicorn.Server] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        loader = threading.Thread(
            target=_load,
            args=(options, state, on_note, on_progress, lambda: _stop(holder)),
            name="edge-steer-loader",
            daemon=True,
        )
        loader.start()
        if on_listening:
            host = f"[{options.host}]" if ":" in options.host else options.host  # IPv6
            on_listening(f"http://{host}:{options.port}")
        try:
            yield
        finally:
            if state.lanes is not None:
                state.lanes.stop()

    hosts = allowed_hosts(options.host, options.allow_hosts)
    app = create_app(state, Admission(port=options.port, hosts=hosts), lifespan)
    log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn's, plus one line per refusal
    log_config["loggers"]["edge_steer.server"] = {"handlers": ["default"], "level": "INFO"}
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        http=HeaderDeadline,
        log_level="warning",
        log_config=log_config,
        timeout_graceful_shutdown=GRACE_SECONDS,
    )
    holder["server"] = server = _AnsweringServer(config, state)
    server.run()
    if state.error is not None:
        raise state.error


class _AnsweringServer(uvicorn.Server):
    """uvicorn's Server, answering every open request before shutting down (uvicorn would
    wait GRACE_SECONDS for requests that cannot end by themselves, then cancel them)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: Any = None) -> None:
        self.state.closing = True
        if self.state.lanes is not None:
            await asyncio.to_thread(self.state.lanes.stop)
        await super().shutdown(sockets)
        if self.force_exit:  # a second Ctrl-C skips the app's own shutdown, which asyncio.run
            await self.lifespan.shutdown()  # would then cancel mid-wait and log a traceback


def _stop(holder: dict) -> None:
    holder["server"].should_exit = True


def _load(options, state: ServerState, on_note, on_progress, stop: Callable[[], None]) -> None:
    try:
        served, lanes = build(options, on_note=on_note, on_progress=on_progress)
    except Exception as exc:  # reported by `serve` once uvicorn has stopped
        state.error = exc if isinstance(exc, EdgeSteerError) else EngineError(f"loading: {exc}")
        stop()
        return
    state.served, state.lanes = served, lanes
    lanes.start()
    on_note(f"ready: {served.model_id} on {len(lanes.lanes)} lane(s)")


def build(
    options: ServeOptions,
    *,
    on_note: Callable[[str], None] = lambda _: None,
    on_progress: runtime.Progress = lambda *_: None,
) -> tuple[Served, Lanes]:
    """Model, vectors, presets and lanes for `options` (the engine thread not yet started)."""
    if options.parallel > 1 and options.batch_invariant:
        ggml.one_row_kernels()  # before the first decode, which fixes ggml's choice
    # every lane's KV counts
    lanes_kv = replace(
        options.load, ctx=options.load.ctx * options.parallel, repack=options.repacked
    )
    model = runtime.load_model_from(lanes_kv, on_note=on_note)
    if note := runtime.past_training(model, options.load.ctx, "each lane's --ctx"):
        on_note(note)
    try:
        layers = steering.parse_layers(options.layers, model.n_layer)
        pool = VectorPool(
            model, allow_train=options.allow_train, layers=layers, threads=options.load.threads
        )
        for name, spec in options.presets.items():
            _load_preset(pool, name, spec, on_progress)
        batcher = _batcher(model, options)
    except BaseException:
        model.close()
        raise
    on_note(_lane_memory(batcher, options))
    served = Served(pool, options.model_id, _aliases(options), n_ctx=options.load.ctx)
    lanes = Lanes(
        batcher,
        pool,
        n_ctx=options.load.ctx,
        queue_size=options.queue_size,
        batch_invariant=options.batch_invariant,
    )
    return served, lanes


def _batcher(model: Model, options: ServeOptions) -> Batcher:
    """One context for every lane: `parallel` sequences of `ctx` tokens each, and batches
    that hold a prompt chunk (the CLI's, so prompts decode as `generate` decodes them) or
    the next token of every lane."""
    runtime.check_ctx(options.load.ctx)
    runtime.check_threads(options.load.threads)
    lanes, chunk = options.parallel, min(DEFAULT_BATCH, options.load.ctx)
    context = Context(
        model,
        n_ctx=options.load.ctx * lanes,
        n_batch=max(chunk, lanes),
        n_seq=lanes,
        threads=options.load.threads,
        row_steering=lanes > 1,
        # a lane's cells in order, as alone, however lanes come and go (needed only where the
        # kernels are batch-invariant; one pool is faster)
        separate_kv=lanes > 1 and options.batch_invariant,
    )
    first, last = steering.parse_layers(options.layers, model.n_layer) or (1, model.n_layer - 1)
    return Batcher(
        context,
        first=first,
        last=last,
        prompt_chunk=chunk,
        merge_prompts=not options.batch_invariant,  # a chunk beside others: not as alone
    )


def _load_preset(pool: VectorPool, name: str, spec: dict[str, float], on_progress) -> None:
    """A preset's vectors, from the store or trained now (a preset is the operator's choice,
    so built-in concepts are trained for it whatever --allow-train says)."""
    for vector in spec:
        found = pool.library.get(
            vector,
            lambda v: runtime.vector_file(
                pool.model, v, on_progress=on_progress, threads=pool.threads
            ),
        )
        _check_preset_layers(name, pool.layers, vector, found)
    pool.presets[name] = dict(spec)


def _check_preset_layers(
    preset: str, layers: tuple[int, int] | None, name: str, vector: vectors.ControlVector
) -> None:
    """A preset whose vector has no block within --layers would steer nothing, silently."""
    try:
        steering.check_in_layers(layers, name, vector)
    except BadInput as exc:
        raise BadInput(f"preset {preset!r}: {exc}, or change --layers") from None


def _lane_memory(batcher: Batcher, options: ServeOptions) -> str:
    context = batcher.ctx
    sizes = context.buffers
    parts = " + ".join(f"{kind} {files.size_text(size)}" for kind, size in sizes.items())
    exact = (
        "each reply exactly as alone"
        if options.batch_invariant
        else "repacked weights: a batched reply may differ from its reply alone at a near-tie"
    )
    return (
        f"lanes: {options.parallel} sequence{'s' if options.parallel > 1 else ''} of "
        f"{options.load.ctx} tokens on one context "
        f"({parts}), batches of up to {context.n_batch} tokens; {exact}"
    )


def model_id(given: str | None, path: Path) -> str:
    """What /v1/models calls the model: the catalog name as given (`demo`, `mistral:q4_k_m`),
    or a file's name without .gguf; never a path."""
    given = given or model_files.default_model()
    return path.stem if model_files.looks_like_model_path(given) else given


def _aliases(options: ServeOptions) -> frozenset[str]:
    """Other names that mean the served model: its file name, with and without .gguf."""
    return frozenset({options.path.name, options.path.stem, str(options.path)})
