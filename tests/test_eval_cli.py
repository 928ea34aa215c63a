"""`edge-steer eval` as a user runs it (tiny model: plumbing, JSON, files, errors, /vectors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_cli import assert_clean_error, run

from edge_steer import dataset, evaluate, metrics, store, vectors
from edge_steer.engine import SCORED_TOGETHER, Context
from edge_steer.evaluate import Point, Sweep

PROBES = [
    {"prompt": "The weather today is", "positive": " calm and quiet.", "negative": " loud."},
    {"prompt": "My neighbour said", "positive": " softly, relax.", "negative": " go away!"},
]


@pytest.fixture()
def calm(tmp_path):
    """A vector file for the tiny model (concept 'calm', blocks 2-4) and a probes file."""
    rng = np.random.default_rng(0)
    directions = {n: 2 * rng.normal(size=64).astype(np.float32) for n in (2, 3, 4)}
    path = vectors.write(
        vectors.ControlVector(directions, "llama", {"concept": "calm"}), tmp_path / "calm.gguf"
    )
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    return path, probes


def test_eval_json_reports_what_it_measured_and_stores_it(calm, tiny_dense_path, tiny_dense):
    path, probes = calm
    result = run(
        *f"eval {path} --model {tiny_dense_path} --probes {probes} --strengths -1,0,1 "
        "--samples 2 --baseline --personas calm,angry --threads 1 --json".split()
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    points = {p["strength"]: p for p in data["points"]}
    assert sorted(points) == [-1, 0, 1] and data["probes"] == 2 and data["concept"] == "calm"
    assert points[0]["effect"] == 0 and points[0]["ppl_ratio"] == 1
    assert all(p["perplexity"] > 1 and p["degenerate"] in (0, 0.5, 1) for p in points.values())
    assert [(b["persona"], b["strength"]) for b in data["baseline"]] == [
        ("calm", 1),
        ("angry", -1),
    ]
    assert "extremely calm" in data["baseline"][0]["prompt"]

    # the same measurement in-process: the CLI applied this vector at strength 1 on its blocks
    rows = vectors.combine([(vectors.read(path), 1.0)], tiny_dense.n_layer, tiny_dense.n_embd)
    margins = {}
    # scored side by side as eval scores them: llama.cpp's numbers move with batch shape
    with Context(tiny_dense, n_ctx=1024, threads=1, n_seq=SCORED_TOGETHER) as ctx:
        for strength in (0, 1):
            ctx.set_steering(rows * strength if strength else None)
            margins[strength] = metrics.probe_margin(ctx, dataset.load_probes_jsonl(probes))
    assert points[1]["effect"] == pytest.approx(margins[1] - margins[0], abs=1e-3)

    stored = vectors.read(path)
    assert stored.metadata["eval_verdict"] == data["verdict"] and data["saved"] == str(path)
    recommended = tuple(data["recommended"]) if data["recommended"] else None
    assert vectors.recommended_range(stored) == recommended


def test_eval_table_chart_and_plot_without_saving(calm, tiny_dense_path, tmp_path):
    pytest.importorskip("matplotlib")
    path, probes = calm
    before = path.read_bytes()
    png = tmp_path / "plot.png"
    result = run(
        *f"eval {path} --model {tiny_dense_path} --probes {probes} --strengths=-1..1 "
        f"--samples 1 --threads 1 --no-save --plot {png}".split()
    )
    assert result.returncode == 0, result.stderr
    assert "effect (nats)" in result.stdout and "perplexity ratio from x1" in result.stdout
    assert "│" in result.stdout and "+0.5" in result.stdout  # chart rows, step 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.read_bytes() == before  # --no-save leaves the vector alone


def test_default_sweep_is_whole_steps_and_halves_a_first_step_over_the_limit(
    calm, tiny_dense_path
) -> None:
    path, probes = calm
    result = run(
        *f"eval {path} --model {tiny_dense_path} --probes {probes} --samples 0 --threads 1 "
        "--no-save --json".split()
    )
    assert result.returncode == 0, result.stderr
    points = json.loads(result.stdout)["points"]
    ratio = {p["strength"]: p["ppl_ratio"] for p in points}
    halves = {s / 2 for s in (-1, 1) if ratio[s] > evaluate.MAX_PPL_RATIO}
    assert set(ratio) == {-2, -1, 0, 1, 2} | halves
    assert {p["degenerate"] for p in points} == {None}  # nothing sampled: not "0%"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("{vec} --strengths 2..-2", "the range must go from low to high"),
        ("{vec} --strengths x", "bad strengths 'x'"),
        ("{vec}:0.5", "give the vector without a strength"),
        ("{bare}", "no probes for concept 'bare': pass --probes FILE.jsonl"),
        (
            "{vec} --probes {probes} --baseline",
            "--baseline needs persona words for the custom concept 'calm'",
        ),
        ("{vec} --probes missing.jsonl", "probes file not found"),
        ("nosuchvector", "unknown vector 'nosuchvector'"),
        ("{vec} --samples -1", "--samples must be 0 to 64"),
        ("{vec} --samples 100000", "--samples must be 0 to 64"),  # was llama.cpp's error
        ("{vec} --strengths=1e308", "strengths must be numbers from -10 to 10"),  # was NaN JSON
        ("{vec} --probes {probes} --strengths 1", "on one side of 0 cannot judge the other"),
        ("{vec} --probes {probes} --plot plot.txt", "--plot plot.txt: name a .png file"),
        ("{vec} --probes {probes} --plot {vec}/p.png", "is not a writable folder"),
        ("{vec} --probes {probes} --strengths 0", "no strength but 0 to measure"),
        # steered nothing, measured "does not work" and stored it over the vector's range
        ("{vec} --probes {probes} --layers 5-5", "calm.gguf's blocks (2-4): pick blocks"),
    ],
)
def test_bad_eval_input_is_one_clean_line(args, words, calm, tiny_dense_path) -> None:
    path, probes = calm
    no_concept = vectors.ControlVector(vectors.read(path).directions)
    bare = vectors.write(no_concept, path.with_name("bare.gguf"))
    argv = args.format(vec=path, bare=bare, probes=probes).split()
    assert_clean_error(run("eval", *argv, "--model", str(tiny_dense_path)), words)


def test_plot_without_matplotlib_names_the_extra(calm, tiny_dense_path, tmp_path) -> None:
    """matplotlib made unimportable: the error comes before any measuring."""
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    path, probes = calm
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "edge_steer", "eval", str(path), "--model", str(tiny_dense_path),
         "--probes", str(probes), "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert_clean_error(result, "--plot needs matplotlib")
    assert "pip install matplotlib" in result.stderr
    assert not (tmp_path / "p.png").exists() and "eval_verdict" not in vectors.read(path).metadata


def test_repl_vectors_command_shows_the_recommended_range(calm, tiny_dense_path, tiny_dense):
    path, _ = calm
    sweep = Sweep((Point(-1, -0.5, 10, 0), Point(0, 0, 10, 0), Point(1.5, 0.8, 11, 0)))
    evaluate.save(path, sweep, tiny_dense, store.fingerprint(tiny_dense.path), "all")
    result = subprocess.run(
        [sys.executable, "-m", "edge_steer", "chat", "--model", str(tiny_dense_path),
         "--vector", f"{path}:0.5", "-n", "4"],
        input="/vectors\n/quit\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{path}: recommended -1..+1.5 (works on {tiny_dense.name})" in result.stderr


def test_many_long_samples_get_a_context_that_holds_them(calm, tiny_dense_path):
    path, probes = calm  # 32 samples x 48 tokens side by side: more than the default context
    result = run(
        *f"eval {path} --model {tiny_dense_path} --probes {probes} --strengths 1 "
        "--samples 32 --sample-tokens 48 --no-save --threads 1 --json".split()
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["points"][0]["degenerate"] is not None


@pytest.mark.parametrize("width", [80, 120])
def test_chat_table_keeps_its_figures_in_a_narrow_terminal(width) -> None:
    """The reply column gives way (and goes under 90 columns); the figures never do."""
    from rich.console import Console

    from edge_steer.chateval import ChatPoint
    from edge_steer.cli.evaluate import _chat_table

    reply = "It was absolutely fabulous! I'm so excited to be working with you all on this"
    points = [ChatPoint(s, 0.05 * s, 40, 0.5, 0.125, reply, 24) for s in (-1.0, 0.0, 1.0)]
    console = Console(width=width, record=True)
    console.print(_chat_table(points, width))
    text = console.export_text()
    assert "+0.050" in text and "-0.050" in text and "12%" in text and "degenerate" in text
    assert max(map(len, text.splitlines())) <= width
    assert ("It was absolutely" in text) == (width >= 90)


def test_chat_loops_inside_the_recommended_range_are_flagged() -> None:
    from edge_steer.chateval import ChatPoint
    from edge_steer.cli.evaluate import chat_loop_warnings

    loops = {-2.0: 6, -1.0: 1, 0.0: 0, 1.0: 5, 2.0: 9}  # of 24 replies
    points = [ChatPoint(s, 0.0, 64, 0.0, n / 24, "", 24) for s, n in loops.items()]
    warnings = chat_loop_warnings(points, [-1.0, 1.0])
    assert warnings == [  # not -1: one loop against none is what chance does half the time
        "chat at +1: 5 of 24 replies loop (0 unsteered; chance alone: p = 0.025); "
        "for chat, stay nearer 0 than +1"
    ]
    assert chat_loop_warnings(points, None) == []


def test_excess_loops_are_weighed_against_chance() -> None:
    """Fisher's exact test, one-sided: its values for 24 replies against 24 unsteered."""
    from edge_steer.chateval import ChatPoint, excess_loops_p

    def point(loops: int, replies: int = 24) -> ChatPoint:
        return ChatPoint(1.0, 0.0, 64, 0.0, loops / replies, "", replies)

    assert excess_loops_p(point(1), point(0)) == 0.5  # which of two halves the one loop hit
    assert excess_loops_p(point(0), point(3)) == 1.0
    assert excess_loops_p(point(5), point(0)) == pytest.approx(0.02483, abs=1e-5)
    assert excess_loops_p(point(5), point(1)) > 0.05 > excess_loops_p(point(7, 64), point(0, 64))


def test_the_calibration_line_names_the_entropy_budget_of_chat_models() -> None:
    from edge_steer.cli.evaluate import calibration_line

    base = {"budget": 1.15, "entropy_budget": None, "scale": 6.2}
    chat = {**base, "entropy_budget": 0.25}
    assert calibration_line(base).startswith("calibrated: ±1 = x1.15 perplexity on held-in")
    assert "x1.15 perplexity or +0.25 nats of entropy, whichever came first" in (
        calibration_line(chat)
    )


def test_eval_chat_replies_out_of_range_fail_before_the_model_loads() -> None:
    result = run("eval", "happy", "-m", "no-such-model", "--chat", "--chat-replies", "0")
    assert result.returncode == 2 and "--chat-replies must be 1-8" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--chat-replies", "2"], "--chat-replies needs --chat: add --chat, or leave it out"),
        (["--personas", "calm,angry"], "add one of them, or leave --personas out"),
        (["--plot", ""], "--plot is empty: name a file"),  # wrote no plot, exit 0
        (["--probes", " "], "--probes is empty"),  # the built-in probes, silently
        (["--seed", "4294967295"], "--seed 4294967295 is out of range: use 0 to 4294967294"),
        (["--seed", "-1"], "--seed -1 is out of range"),  # samples differed run to run
    ],
)
def test_eval_flags_without_their_partner_are_refused(flags, words) -> None:
    """Was: silently ignored (--chat-replies), or a --baseline nobody asked for (--personas)."""
    result = run("eval", "happy", "-m", "no-such-model", *flags)
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_a_probe_past_the_context_is_named_before_the_sweep(calm, tiny_dense_path) -> None:
    """Was: 'cannot score 5002 tokens from position 5001', naming neither probe nor limit."""
    path, probes = calm
    long = {"prompt": "word " * 3000, "positive": " good", "negative": " bad"}
    probes.write_text(probes.read_text() + json.dumps(long) + "\n")
    result = run("eval", str(path), "--model", str(tiny_dense_path), "--probes", str(probes))
    assert_clean_error(result, f"probe {len(PROBES) + 1} ('word word")
    assert "where a probe takes at most 1024" in result.stderr
