"""Load a model and open a steered context from plain options.

The CLI, the server and scripts all start here. Nothing in this module prints: what a person
should hear goes through callbacks (`on_note` for one-line notes such as the offload split,
`on_progress(label, done, total)` for training, `download_bar` for a tqdm-like class that
huggingface_hub drives while downloading).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# llama.cpp's libraries must be loaded before numpy's: with numpy loaded first, a CUDA build of
# llama-cpp-python (OpenMP, GCC's libgomp) segfaulted inside llama_model_load_from_file on an
# H100 machine, even with no layers on the GPU. Every path that loads a model comes through here.
import llama_cpp  # noqa: F401

from . import library, machine, model_files, offload, steering
from . import rpc as rpc_
from .constants import DEFAULT_CTX
from .engine import (
    Context,
    Generation,
    Model,
    Sampler,
    SamplerSettings,
    out_of_range,
    range_text,
    takes_whole_number,
)
from .errors import BadInput
from .files import size_text
from .vectors import check_strength, parse_spec, spec_strengths

Note = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (what, done, total)
VectorSpecs = str | Iterable[str] | Mapping[str, float]


def _quiet(*_args: object) -> None:
    pass


@dataclass(frozen=True)
class LoadOptions:
    """Which model, and how it is placed and run: one value that a front end builds once and
    hands down, instead of the same keywords threaded through every layer."""

    model: str | None = None  # catalog name, hf:REPO/FILE or path; None: $EDGE_STEER_MODEL
    ctx: int = DEFAULT_CTX  # tokens of context; the fit checks count this much KV cache
    threads: int | None = None  # None: every core this process may use
    gpu_layers: str | None = None  # N, "all" or "auto" (None: auto)
    moe_offload: str | None = None  # "none", "all", N or "auto" (None: auto)
    force: bool = False  # go ahead even if RAM or disk looks too small
    offline: bool = False  # never ask the Hub
    rpc: str | None = None  # "host:port,..." of `edge-steer worker`s; None: $EDGE_STEER_RPC
    # llama.cpp's re-layout of CPU weights for its faster kernels (as its binaries do). False
    # keeps each row of a batch bit for bit independent of the others (the server's batching)
    repack: bool = True

    def check(self) -> None:
        """What is wrong before anything loads: counts out of range."""
        check_ctx(self.ctx)
        check_threads(self.threads)

    @classmethod
    def of(
        cls,
        model: str | Path | None,
        *,
        ctx: int,
        threads: int | None = None,
        gpu_layers: str | int | None,
        moe_offload: str | int | None,
        force: bool,
        offline: bool,
        rpc: str | Iterable[str] | None,
    ) -> LoadOptions:
        """From the looser values the keyword API (`load`, `load_model`) takes: a Path, an
        int layer count, workers as a list."""
        if model is not None and not (isinstance(model, str | Path) and str(model).strip()):
            raise BadInput(
                f"model={model!r}: use a catalog name (edge-steer models list), hf:REPO/FILE "
                "or a .gguf path, or None for $EDGE_STEER_MODEL"
            )
        return cls(
            model=_text(model),
            ctx=ctx,
            threads=threads,
            gpu_layers=_text(gpu_layers),
            moe_offload=_text(moe_offload),
            force=force,
            offline=offline,
            rpc=None if rpc is None else ",".join(_specs(rpc, "rpc")),
        )


def load_model(
    model: str | Path | None = None,
    *,
    gpu_layers: str | int | None = None,
    moe_offload: str | int | None = None,
    ctx: int = DEFAULT_CTX,
    force: bool = False,
    offline: bool = False,
    rpc: str | Iterable[str] | None = None,
    on_note: Note = _quiet,
    download_bar: type | None = None,
) -> Model:
    """Resolve `model` (catalog name, hf:REPO/FILE or path; default $EDGE_STEER_MODEL or
    `mistral:q4_k_m`), download it once if needed, split it between GPU and CPU memory
    (`gpu_layers`: N, "all", "auto"; `moe_offload`: "none", "all", N, "auto") and load it.
    `rpc`: "host:port,..." of `edge-steer worker`s whose devices count as GPUs (None reads
    $EDGE_STEER_RPC); each is checked and registered before anything loads."""
    options = LoadOptions.of(
        model,
        ctx=ctx,
        gpu_layers=gpu_layers,
        moe_offload=moe_offload,
        force=force,
        offline=offline,
        rpc=rpc,
    )
    return load_model_from(options, on_note=on_note, download_bar=download_bar)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def load_model_from(
    options: LoadOptions, *, on_note: Note = _quiet, download_bar: type | None = None
) -> Model:
    """`load_model` for a LoadOptions value (its threads are for contexts, not used here)."""
    path, workers = model_path(options, on_note=on_note, download_bar=download_bar)
    endpoints = [str(w) for w in workers]
    plan = offload.plan_model(
        path, options.gpu_layers, options.moe_offload, options.ctx, endpoints, options.force
    )
    for note in plan.notes:
        on_note(note)
    loaded = Model(
        path,
        gpu_layers=plan.gpu_layers,
        cpu_tensors=plan.cpu_tensors,
        devices=_devices(workers),
        repack=options.repack,
        mmap=plan.mmap or not options.repack,  # nothing repacked: nothing held twice
    )
    if plan.cpu_tensors or plan.gpu_bytes:
        where = ", ".join(f"{name} {size_text(size)}" for name, size in loaded.buffers.items())
        on_note(f"weights: {where}; {len(loaded.overridden)} tensors kept in CPU memory")
    if workers:
        on_note(f"layers: {_split(loaded)}")
    return loaded


def model_path(
    options: LoadOptions, *, on_note: Note = _quiet, download_bar: type | None = None
) -> tuple[Path, list[rpc_.Endpoint]]:
    """The local file `options.model` names (downloaded once, checked to fit this machine
    and its RPC workers' memory) and the workers, checked and registered. A front end that
    downloads before it does anything else (`serve`) calls this first; the load then checks
    the workers again, as minutes of downloading may have passed."""
    workers = rpc_.connect(options.rpc)
    if workers:
        on_note(f"rpc: {len(workers)} worker(s) answered: {', '.join(map(str, workers))}")
    path = model_files.resolve_model(
        options.model,
        offline=options.offline,
        force=options.force,
        use_gpu=offload.parse_gpu_layers(options.gpu_layers) != 0,
        rpc=[str(w) for w in workers],
        ctx=options.ctx,
        say=on_note,
        tqdm_class=download_bar,
    )
    return path, workers


def _devices(workers: list[rpc_.Endpoint]) -> list[str] | None:
    """This machine's GPUs and the workers' devices (None: this machine's GPUs only)."""
    from . import machine

    return [d.name for d in machine.offload_devices([str(w) for w in workers])] if workers else None


def _split(model: Model) -> str:
    """Blocks per device as llama.cpp placed them, RPC devices named by their worker."""
    from .machine import devices

    where = {d.name: d.description for d in devices(rpc=()) if d.name.startswith("RPC")}
    return ", ".join(
        f"{count} on {name}" + (f" ({where[name]})" if name in where else "")
        for name, count in model.layer_devices.items()
    )


def vector_file(
    model: Model,
    name: str,
    *,
    retrain: bool = False,
    on_progress: Progress = _quiet,
    threads: int | None = None,
) -> Path:
    """The file of vector `name` for `model`: a path, a stored vector, or (a built-in concept
    this model has none of yet, or `retrain`) one trained now on `threads` and stored."""
    label = f"training {name!r} on {model.name}"

    def stage_progress(stage: str, done: int, total: int) -> None:
        on_progress(f"{label}: {stage}", done, total)

    return library.resolve(model, name, retrain=retrain, progress=stage_progress, threads=threads)


def steer(
    model: Model,
    vectors: VectorSpecs = (),
    *,
    layers: str | None = None,
    retrain: bool = False,
    on_progress: Progress = _quiet,
    threads: int | None = None,
) -> steering.Steering:
    """The steering for `vectors`: "happy:0.8,lazy:-1", ["happy:0.8"] or {"happy": 0.8};
    names are files, stored vectors or built-in concepts (trained on first use, on
    `threads`)."""
    specs = _specs(vectors)
    if empty := [spec for spec in specs if spec.strip() and not spec_strengths([spec])]:
        raise BadInput(f"--vector {empty[0]!r} names no vector: use NAME[:STRENGTH],...")
    if retrain:  # read what is trained now, not what this process read before
        names = spec_strengths(specs)
        if not names:
            raise BadInput(
                "--retrain trains the --vector concepts again, and none is given: add one"
            )
        library.check_retrain(names)
        for name in names:
            library.for_model(model).drop(name)
    return steering.build(
        model,
        specs,
        layers,
        lambda name: vector_file(
            model, name, retrain=retrain, on_progress=on_progress, threads=threads
        ),
    )


def _check_spec_name(name: str) -> None:
    """A {name: strength} key becomes a spec: a ',' or ':' in it would be read as another
    vector or a strength ({"happy,happy": 1} steered happy at 2)."""
    try:
        survives = "," not in name and parse_spec(f"{name}:1") == (name, 1.0)
    except BadInput:
        survives = False
    if not survives:
        raise BadInput(f"vector name {name!r}: ',' and ':' belong to specs; give one name or path")


def _specs(given: VectorSpecs, what: str = "vectors") -> list[str]:
    """Vectors (or RPC workers) as the CLI's specs, from a spec string, a list of them or
    {name: strength}."""
    if isinstance(given, str):
        return [given]
    if isinstance(given, Mapping):
        for name, strength in given.items():
            check_strength(name, strength)
            _check_spec_name(name)
        return [f"{name}:{float(strength)!r}" for name, strength in given.items()]
    specs = list(given) if isinstance(given, Iterable) else [given]
    if not all(isinstance(spec, str) for spec in specs):
        example = "'host:50052'" if what == "rpc" else "'happy:0.8,lazy:-1'"
        raise BadInput(f"{what}={given!r}: use a str such as {example}, or a list of them")
    return specs


MAX_CTX = 1 << 24  # tokens; far past any model's training context, within llama.cpp's int32


def check_ctx(ctx: int) -> None:
    """Before anything loads: whether the context may fit is `offload.plan_model`'s check."""
    _check_whole("ctx", ctx)
    if not 16 <= ctx <= MAX_CTX:
        raise BadInput(
            f"--ctx {ctx} is out of range: use 16 to {MAX_CTX} tokens (e.g. {DEFAULT_CTX})"
        )


def past_training(model: Model, ctx: int, what: str = "--ctx") -> str | None:
    """A note when `ctx` runs past the context `model` was trained on: llama.cpp allows it
    (and warns in a log nobody sees), but positions past it are ones the model never learned,
    and their KV cache costs memory all the same."""
    trained = model.n_ctx_train
    if not 0 < trained < ctx:
        return None
    return (
        f"{what} {ctx} is past the {trained} tokens {model.name} was trained on: replies "
        f"lose their thread beyond that; {what} {trained} or less keeps to it"
    )


def check_threads(threads: int | None) -> None:
    if threads is not None:
        _check_whole("threads", threads)
        machine.check_thread_count(threads)


def _check_whole(name: str, value: object) -> None:
    """The keyword API's counts, as typer checks the CLI's: `ctx="4096"` is no count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{name}={value!r}: use a whole number")


def open_context(
    model: Model,
    steering_: steering.Steering | None = None,
    *,
    ctx: int = DEFAULT_CTX,
    threads: int | None = None,
) -> Context:
    """A generation context of `ctx` tokens on `model`, with `steering_` applied."""
    if not isinstance(model, Model):
        raise BadInput(f"model={model!r:.60}: use a Model from load_model()")
    if steering_ is not None and not isinstance(steering_, steering.Steering):
        raise BadInput(f"steering={steering_!r:.60}: use a Steering from steer(), or None")
    check_ctx(ctx)
    check_threads(threads)
    context = Context(model, n_ctx=ctx, threads=threads)
    if steering_ is not None:
        steering_.apply(context)
    return context


@dataclass
class Steered:
    """A loaded model, one context and the steering on it: what `load` returns.

    One context holds one conversation's KV cache, so calls take turns: a call from another
    thread waits for the one running (a stream runs until it is used up or closed), and a
    call from the thread whose stream is still open is refused, as it would overwrite that
    stream's cache. `close` waits only for a call inside llama.cpp right now (up to its next
    piece); an open stream, in any thread, raises BadInput when next read."""

    model: Model
    context: Context
    steering: steering.Steering
    _turn_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _holder: int | None = field(default=None, repr=False)  # the thread whose call runs
    _closed: bool = field(default=False, repr=False)
    # whether a call is inside llama.cpp now, not a stream waiting between pieces
    _calls: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _in_call: bool = field(default=False, repr=False)

    def stream(
        self, prompt: str, *, max_tokens: int = 256, **sampling: float | int | None
    ) -> Generation:
        """Continue `prompt`: iterate the result for text as it comes; its `stats` say what
        was decoded. `sampling`: SamplerSettings fields (temperature, top_k, top_p, min_p,
        repeat_penalty, seed), checked against the ranges the CLI takes."""
        self._check_open()
        if not isinstance(prompt, str):
            raise BadInput(f"the prompt must be a str, not {type(prompt).__name__}")
        _check_max_tokens(max_tokens)
        settings = sampler_settings(sampling)
        tokens = self.context.prompt_tokens(prompt)
        sampler = Sampler(self.model, settings)
        generation = self.context.generate(tokens, sampler, max_tokens=max_tokens)
        return Generation(self._in_turn(generation), generation.stats)

    def generate(self, prompt: str, *, max_tokens: int = 256, **sampling: float | int | None):
        """The continuation of `prompt` as one string (see `stream`)."""
        return "".join(self.stream(prompt, max_tokens=max_tokens, **sampling))

    def set_vector(self, name: str, strength: float) -> None:
        """Add, re-weight (or with 0, remove) one vector; takes effect on the next call."""
        check_strength(name, strength)
        with self._turn(), self._calling():
            self.steering.set(name, float(strength))
            self.steering.apply(self.context)

    def close(self) -> None:
        """Free the context and the model, once no call is inside llama.cpp."""
        with self._calls:
            self._closed = True
            self._calls.wait_for(lambda: not self._in_call)
            self.context.close()  # both are no-ops when already closed
            self.model.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BadInput("this Steered is closed: load the model again (edge_steer.load)")

    @contextmanager
    def turn(self) -> Iterator[Context]:
        """The context, for a front end that drives it itself (the `llm` plugin): calls
        from other threads, and `close`, wait until the block ends."""
        with self._turn(), self._calling():
            yield self.context

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This thread's turn on the context, for a whole call or stream."""
        if self._holder == threading.get_ident():
            raise BadInput(
                "a stream of this Steered is still open: finish or close it first (for "
                "replies side by side, load another, or run `edge-steer serve`)"
            )
        while not self._turn_lock.acquire(timeout=0.1):
            self._check_open()  # closed while another thread's stream sits open
        try:
            self._check_open()
            self._holder = threading.get_ident()
            yield
        finally:
            self._holder = None
            self._turn_lock.release()

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """A stretch inside llama.cpp, which `close` waits for."""
        with self._calls:
            self._check_open()
            self._in_call = True
        try:
            yield
        finally:
            with self._calls:
                self._in_call = False
                self._calls.notify_all()

    def _in_turn(self, pieces: Iterator[str]) -> Iterator[str]:
        with self._turn():
            while True:
                with self._calling():  # BadInput once closed
                    piece = next(pieces, None)
                if piece is None:
                    return
                yield piece

    def __enter__(self) -> Steered:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _check_max_tokens(max_tokens: object) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadInput(
            f"max_tokens={max_tokens!r}: use a whole number, 1 or more (generation also "
            "stops at the end of the context)"
        )


def sampler_settings(given: Mapping[str, object]) -> SamplerSettings:
    """SamplerSettings from keyword values, each checked: a known name, a number (the seed
    a whole one, or None), within SAMPLING_LIMITS."""
    known = set(SamplerSettings.__dataclass_fields__)
    if unknown := sorted(set(given) - known):
        raise BadInput(f"unknown sampling option {unknown[0]!r}: use {', '.join(sorted(known))}")
    for name, value in given.items():
        whole = takes_whole_number(name)
        if name == "seed" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise BadInput(f"{name}={value!r}: use {'a whole number' if whole else 'a number'}")
    settings = SamplerSettings(**given)  # type: ignore[arg-type]
    if wrong := out_of_range(settings):
        value = getattr(settings, wrong)
        raise BadInput(f"{wrong}={value!r} is out of range: use {range_text(wrong)}")
    return settings


def load(
    model: str | Path | None = None,
    *,
    vectors: VectorSpecs = (),
    layers: str | None = None,
    ctx: int = DEFAULT_CTX,
    threads: int | None = None,
    gpu_layers: str | int | None = None,
    moe_offload: str | int | None = None,
    retrain: bool = False,
    force: bool = False,
    offline: bool = False,
    rpc: str | Iterable[str] | None = None,
    on_note: Note = _quiet,
    on_progress: Progress = _quiet,
    download_bar: type | None = None,
) -> Steered:
    """Load `model` and open one context steered by `vectors`: the one call a script needs.

    >>> steered = load("demo", vectors={"happy": 1.0})
    >>> steered.generate("The best thing about mornings is", max_tokens=20, temperature=0)
    """
    options = LoadOptions.of(
        model,
        ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        moe_offload=moe_offload,
        force=force,
        offline=offline,
        rpc=rpc,
    )
    return load_from(
        options,
        vectors=vectors,
        layers=layers,
        retrain=retrain,
        on_note=on_note,
        on_progress=on_progress,
        download_bar=download_bar,
    )


def load_from(
    options: LoadOptions,
    *,
    vectors: VectorSpecs = (),
    layers: str | None = None,
    retrain: bool = False,
    on_note: Note = _quiet,
    on_progress: Progress = _quiet,
    download_bar: type | None = None,
) -> Steered:
    """`load` for a LoadOptions value."""
    options.check()  # before minutes of loading, not after
    loaded = load_model_from(options, on_note=on_note, download_bar=download_bar)
    if note := past_training(loaded, options.ctx):
        on_note(note)
    try:
        steering_ = steer(
            loaded,
            vectors,
            layers=layers,
            retrain=retrain,
            on_progress=on_progress,
            threads=options.threads,
        )
        context = open_context(loaded, steering_, ctx=options.ctx, threads=options.threads)
    except BaseException:
        loaded.close()
        raise
    return Steered(loaded, context, steering_)
