"""Converter: every input format, explicit layer numbering, round trips, llama.cpp's loader."""

from __future__ import annotations

import ctypes
import json

import gguf
import llama_cpp as ll
import numpy as np
import pytest
from conftest import safetensors_bytes, write_raw
from typer.testing import CliRunner

from edge_steer import convert, files, gguffile, steering, vectors
from edge_steer.cli import app
from edge_steer.engine import Context, hidden
from edge_steer.errors import BadInput, DamagedFile, DoesNotFit

runner = CliRunner()


def trained_like(n_embd: int = 64, layers=(2, 3, 4)) -> vectors.ControlVector:
    rng = np.random.default_rng(7)
    return vectors.ControlVector(
        {n: rng.normal(size=n_embd).astype(np.float32) for n in layers},
        "llama",
        {
            "concept": "happy",
            "method": "pca-diff",
            "scale_gain": 1.0,
            "pairs": 128,
            "layer_first": layers[0],
            "layer_last": layers[-1],
            "separations": "1.5,2.5,3.5",
        },
    )


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_gguf_npz_gguf_round_trip_is_bit_identical(tmp_path) -> None:
    original = vectors.write(trained_like(), tmp_path / "a.gguf")
    assert invoke("vectors", "convert", str(original), "-o", str(tmp_path / "a.npz"))[0] == 0
    assert (
        invoke("vectors", "convert", str(tmp_path / "a.npz"), "-o", str(tmp_path / "b.gguf"))[0]
        == 0
    )
    assert (tmp_path / "b.gguf").read_bytes() == original.read_bytes()
    back = vectors.read(tmp_path / "b.gguf")
    assert back.metadata == trained_like().metadata
    assert all(type(back.metadata[k]) is type(v) for k, v in trained_like().metadata.items())


def llama_cpp_loader_rows(path, n_layer: int, n_embd: int) -> np.ndarray:
    """What llama.cpp's common loader builds: gguf's own reader, direction.N summed into row
    N-1 of a buffer that starts at block 1."""
    buf = np.zeros((n_layer, n_embd), dtype=np.float32)
    for tensor in gguf.GGUFReader(path).tensors:
        layer = int(tensor.name.split(".")[1])
        buf[layer - 1] += np.asarray(tensor.data, dtype=np.float32)
    return buf


def test_written_file_applied_like_llama_cpp_matches_our_runtime(tiny_dense, tmp_path) -> None:
    m = tiny_dense
    path = vectors.write(trained_like(m.n_embd, (1, 3, 5)), tmp_path / "v.gguf")
    tokens = m.tokenize("The quick brown fox jumps over")
    with Context(m, n_ctx=64, threads=1, capture=True) as ctx:
        (bare,) = hidden.capture(ctx, [tokens])
        buf = llama_cpp_loader_rows(path, m.n_layer, m.n_embd)
        pointer = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert (
            ll.llama_set_adapter_cvec(ctx.ptr, pointer, buf.size, m.n_embd, 1, m.n_layer - 1) == 0
        )
        (theirs,) = hidden.capture(ctx, [tokens])
        steering.build(m, [str(path)], None).apply(ctx)
        (ours,) = hidden.capture(ctx, [tokens])
    assert np.array_equal(theirs, ours)
    assert not np.array_equal(theirs[0, 1], bare[0, 1])  # block 1 really moved
    assert np.array_equal(theirs[0, 0], bare[0, 0])  # block 0 did not


def write_gguf(path, tensors: dict[str, np.ndarray], hint: str, int32_count: bool) -> None:
    """A control vector as repeng (UINT32 layer_count) or cvector-generator (INT32) writes it."""

    def meta(writer) -> None:
        writer.add_string("controlvector.model_hint", hint)
        add = writer.add_int32 if int32_count else writer.add_uint32
        add("controlvector.layer_count", len(tensors))

    write_raw(path, tensors, meta=meta)


def test_cvector_generator_file_with_shift_lands_where_repeng_does(tiny_dense, tmp_path) -> None:
    """The same states measured after blocks 1..5: repeng writes direction.B, cvector-generator
    writes direction.B+1. Converted (the latter with --shift -1) they are the same vector."""
    m = tiny_dense
    rng = np.random.default_rng(1)
    states = {b: rng.normal(size=m.n_embd).astype(np.float32) for b in range(0, m.n_layer - 1)}
    write_gguf(
        tmp_path / "repeng.gguf",
        {f"direction.{b}": v for b, v in states.items() if b},
        "mistral",
        int32_count=False,
    )
    write_gguf(
        tmp_path / "cvgen.gguf",
        {f"direction.{b + 1}": v for b, v in states.items()},
        "llama",
        int32_count=True,
    )
    code, output = invoke(
        "vectors",
        "convert",
        str(tmp_path / "cvgen.gguf"),
        "-o",
        str(tmp_path / "cv.gguf"),
        "--shift",
        "-1",
    )
    assert code == 0 and "cvector-generator" in output
    assert (
        invoke(
            "vectors", "convert", str(tmp_path / "repeng.gguf"), "-o", str(tmp_path / "rp.gguf")
        )[0]
        == 0
    )
    cv, rp = vectors.read(tmp_path / "cv.gguf"), vectors.read(tmp_path / "rp.gguf")
    assert cv.layers == rp.layers == list(range(1, m.n_layer - 1))
    for b in cv.layers:
        assert np.array_equal(cv.directions[b], rp.directions[b])
        assert np.array_equal(cv.directions[b], states[b])
    # and in llama.cpp: the converted direction.3 moves l_out-3 by exactly states[3]
    one = vectors.write(vectors.ControlVector({3: cv.directions[3]}), tmp_path / "one.gguf")
    tokens = m.tokenize("hello there")
    with Context(m, n_ctx=32, threads=1, capture=True) as ctx:
        (bare,) = hidden.capture(ctx, [tokens])
        steering.build(m, [str(one)], None).apply(ctx)
        (moved,) = hidden.capture(ctx, [tokens])
    assert np.array_equal(moved[0, 2], bare[0, 2])
    np.testing.assert_allclose(moved[0, 3] - bare[0, 3], states[3], atol=1e-5)


def test_every_input_format_reads_the_same_directions(tmp_path) -> None:
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(4, 8)).astype(np.float32)
    keyed = {f"layers.{i}": rows[i] for i in (1, 2, 3)}
    np.save(tmp_path / "rows.npy", rows)
    np.savez(tmp_path / "keyed.npz", **keyed)
    np.savez(tmp_path / "matrix.npz", directions=rows)
    (tmp_path / "v.json").write_text(json.dumps({str(i): rows[i].tolist() for i in (1, 2, 3)}))
    (tmp_path / "rows.json").write_text(json.dumps(rows.tolist()))
    (tmp_path / "v.safetensors").write_bytes(
        safetensors_bytes({k: ("F32", v) for k, v in keyed.items()}, {"model_hint": "mistral"})
    )
    bf16 = {k: ("BF16", (v.view(np.uint32) >> 16).astype(np.uint16)) for k, v in keyed.items()}
    (tmp_path / "bf16.safetensors").write_bytes(safetensors_bytes(bf16))
    for name in ("rows.npy", "keyed.npz", "matrix.npz", "v.json", "rows.json", "v.safetensors"):
        vector, _ = convert.load(tmp_path / name)
        assert vector.layers == [1, 2, 3], name
        for i in (1, 2, 3):
            assert np.array_equal(vector.directions[i], rows[i]), name
        assert vector.metadata["source"].startswith(name)
    vector, _ = convert.load(tmp_path / "bf16.safetensors")
    for i in (1, 2, 3):
        np.testing.assert_allclose(vector.directions[i], rows[i], rtol=1e-2)


def test_layer_base_hidden_states_and_its_detection(tmp_path) -> None:
    rows = np.arange(7 * 4, dtype=np.float32).reshape(7, 4) + 1
    np.save(tmp_path / "hs.npy", rows)
    vector, notes = convert.load(tmp_path / "hs.npy", layer_base="hidden-states")
    assert vector.layers == [1, 2, 3, 4, 5]  # hidden_states[0] (embeddings) and [1] dropped
    assert np.array_equal(vector.directions[1], rows[2])
    assert any("dropped" in n for n in notes)
    detected, notes = convert.load(tmp_path / "hs.npy", n_layer=6)  # 7 rows for 6 blocks
    assert detected.layers == vector.layers and any("hidden states" in n for n in notes)
    plain, notes = convert.load(tmp_path / "hs.npy")
    assert plain.layers == [1, 2, 3, 4, 5, 6] and any(
        "assumed --layer-base block" in n for n in notes
    )
    with pytest.raises(BadInput, match=r"with --shift -9, every direction \(key 0-6\) lands "):
        convert.load(tmp_path / "hs.npy", shift=-9)  # (--shift 1 would keep key 0 too)


@pytest.mark.parametrize(
    ("name", "content", "message", "error"),
    [
        ("x.txt", b"hello", "unknown format", BadInput),
        ("x.json", b"{not json", "not valid JSON", DamagedFile),
        ("x.json", b'{"1": ["a"]}', "lists of numbers", DamagedFile),
        ("x.json", b'{"1": [1, NaN]}', "NaN or Inf", DamagedFile),
        ("x.json", b'{"alpha": [1, 2]}', "cannot tell the layer", DamagedFile),
        ("x.json", b'{"0": [1, 2]}', "lands before block 1.*--shift 1 keeps", BadInput),
        ("x.json", b"{}", "no direction.N", DamagedFile),
        ("x.json", b'{"1": [1, 2], "2": [1, 2, 3]}', "unlike the other layers", DamagedFile),
        ("x.json", b'{"1": [[1, 2], [3, 4]]}', "must be 1-D", DamagedFile),
        (
            "x.safetensors",
            b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}",
            "damaged safetensors",
            DamagedFile,
        ),
        ("x.npz", b"PK\x03\x04garbage", "damaged .npz", DamagedFile),
        ("x.npz", b"PK\x05\x06" + bytes(18), "no direction.N", DamagedFile),  # np.savez(f)
        ("x.json", b"[" * 100000 + b"]" * 100000, "RecursionError", DamagedFile),
        ("x.json", b'{"-3": [1, 2]}', "cannot tell the layer of '-3'", DamagedFile),  # was 3
        ("x.json", b'{"direction.-3": [1]}', "layer of 'direction.-3'", DamagedFile),  # 3
        ("x.json", b'{"direction.3.5": [1]}', "layer of 'direction.3.5'", DamagedFile),  # 5
        ("x.json", b'{"99999999999999999999": [1, 2]}', "no model has that many", BadInput),
        (
            "x.json",
            b'{"directions": {"1": [1, 2]}, "layer_base": "layers"}',
            "unknown layer_base 'layers': use block or hidden-states",
            DamagedFile,
        ),
        (  # was AttributeError's traceback
            "x.json",
            b'{"directions": {"1": [1, 2]}, "metadata": ["a"]}',
            "its metadata is not an object",
            DamagedFile,
        ),
        (  # was "damaged safetensors file (BadInput)"
            "x.safetensors",
            b'\x44\x00\x00\x00\x00\x00\x00\x00{"layers.5": {"dtype": "I32", "shape": [1], '
            b'"data_offsets": [0, 4]}}\x00\x00\x00\x00',
            "tensor layers.5 is I32",
            BadInput,
        ),
    ],
)
def test_bad_inputs_get_one_line_errors(tmp_path, name, content, message, error) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(error, match=message):
        convert.load(tmp_path / name)
    code, output = invoke(
        "vectors", "convert", str(tmp_path / name), "-o", str(tmp_path / "o.gguf")
    )
    assert code == 2 and output.count("\n") == 1 and "Traceback" not in output
    assert not (tmp_path / "o.gguf").exists()


def test_pickled_npy_is_refused(tmp_path) -> None:
    np.save(tmp_path / "p.npy", np.array({"1": [1.0]}, dtype=object), allow_pickle=True)
    with pytest.raises(BadInput, match="pickled"):
        convert.load(tmp_path / "p.npy")


def test_model_checks_and_metadata_options(tiny_dense_path, tmp_path) -> None:
    def convert_for_tiny(source: str, *options: str):
        out = str(tmp_path / "o.gguf")
        return invoke(
            "vectors",
            "convert",
            str(tmp_path / source),
            "-o",
            out,
            "--model",
            str(tiny_dense_path),
            *options,
        )

    np.save(tmp_path / "wide.npy", np.ones((3, 65), np.float32))
    code, output = convert_for_tiny("wide.npy")
    assert code == 2 and "n_embd 65" in output
    np.save(tmp_path / "deep.npy", np.ones((9, 64), np.float32))
    code, output = convert_for_tiny("deep.npy")
    assert code == 2 and "direction.6" in output
    code, output = convert_for_tiny(
        "deep.npy",
        "--layers",
        "2-4",
        "--method",
        "repeng pca_diff",
        "--scale-rule",
        "unit",
        "--source",
        "my lab",
    )
    assert code == 0, output
    vector = vectors.read(tmp_path / "o.gguf")
    assert vector.layers == [2, 3, 4] and vector.model_hint == "llama"
    assert vector.metadata == {
        "source": "my lab",
        "method": "repeng pca_diff",
        "scale_rule": "unit",
        "layer_first": 2,
        "layer_last": 4,
    }
    code, output = invoke(
        "vectors", "convert", str(tmp_path / "deep.npy"), "-o", str(tmp_path / "o.txt")
    )
    assert code == 2 and ".gguf or .npz" in output
    for option, value, words in (
        ("--model-hint", "lla\nma", "not an architecture name"),  # was stored, and listed
        ("--source", "a\tb", "not one line of text"),
    ):
        code, output = convert_for_tiny("deep.npy", "--layers", "2-4", option, value)
        assert code == 2 and words in output


def test_labels_from_someone_elses_file_are_shown_not_run(edge_steer_home) -> None:
    """A vector's concept and model hint are text anyone can write into a GGUF: an escape
    sequence would clear the screen, a newline fake a row. Both are shown as escapes."""
    concept, hint = "hap\npy\x1b[2J", "llama\x1b]0;owned\x07"
    labelled = vectors.ControlVector({1: np.ones(8, np.float32)}, hint, {"concept": concept})
    vectors.write(labelled, edge_steer_home / "vectors" / "odd.gguf")
    code, listed = invoke("vectors", "list")
    row = next(line for line in listed.splitlines() if line.lstrip().startswith("odd"))
    assert code == 0 and "hap\\npy\\x1b[2J" in row and "\x1b" not in listed
    code, info = invoke("vectors", "info", "odd")
    assert code == 0 and "concept: hap\\npy\\x1b[2J\n" in info
    assert "for llama\\x1b]0;owned\\x07, blocks 1," in info and "\x1b" not in info
    code, doc = invoke("vectors", "info", "odd", "--json")
    assert json.loads(doc)["metadata"]["concept"] == concept  # the data itself is kept


def test_list_info_rm_and_mix(edge_steer_home, tmp_path, tiny_dense_path) -> None:
    store = edge_steer_home / "vectors"
    a = trained_like(8, (1, 2))
    b = vectors.ControlVector(
        {2: np.ones(8, np.float32), 3: np.ones(8, np.float32)}, "llama", {"concept": "lazy"}
    )
    vectors.write(a, store / "fp1" / "mixa.gguf")
    vectors.write(b, store / "mixb.gguf")
    code, output = invoke("vectors", "list", "--json")
    rows = {r["name"]: r for r in json.loads(output) if r["name"].startswith("mix")}
    assert code == 0 and rows["mixa"]["layers"] == "1-2" and rows["mixb"]["model"] == "any"
    code, output = invoke("vectors", "info", "mixa", "--json")
    info = json.loads(output)
    assert info["metadata"]["concept"] == "happy"
    assert info["norms"]["2"] == pytest.approx(float(np.linalg.norm(a.directions[2])))
    code, output = invoke(
        "vectors", "info", str(store / "fp1" / "mixa.gguf"), "-m", str(tiny_dense_path)
    )
    assert code == 2 and "n_embd 8 but the model has 64" in output  # --model was not checked
    code, output = invoke("vectors", "mix", "mixa*0.5 + mixb*-1", "-o", str(tmp_path / "m.gguf"))
    assert code == 0, output
    mixed = vectors.read(tmp_path / "m.gguf")
    assert mixed.layers == [1, 2, 3]
    assert np.array_equal(mixed.directions[2], np.float32(0.5) * a.directions[2] - 1)
    assert np.array_equal(mixed.directions[3], -np.ones(8, np.float32))
    assert "concept" not in mixed.metadata  # two concepts: neither
    code, output = invoke("vectors", "mix", "-1*mixa", "-o", str(tmp_path / "n.gguf"))
    assert code == 2 and "'-1*mixa' reads as options" in output  # was "No such option: -1"
    code, output = invoke("vectors", "mix", "-mixa", "-o", str(tmp_path / "n.gguf"))
    assert code == 2 and "'-mixa' reads as -m ixa" in output  # was "Missing argument"
    code, output = invoke("vectors", "mix", "-o", str(tmp_path / "neg.gguf"), "--", "-mixa")
    negated = vectors.read(tmp_path / "neg.gguf").directions[1]
    assert code == 0 and np.array_equal(negated, -a.directions[1])
    for expression, concept in (("mixa*3", "happy"), ("mixa*-1", None)):
        assert invoke("vectors", "mix", expression, "-o", str(tmp_path / "s.gguf"))[0] == 0
        assert vectors.read(tmp_path / "s.gguf").metadata.get("concept") == concept
    vectors.write(vectors.ControlVector({1: np.ones(4, np.float32)}), store / "narrow.gguf")
    code, output = invoke("vectors", "mix", "mixa + narrow", "-o", str(tmp_path / "n.gguf"))
    assert code == 2 and "n_embd" in output and not (tmp_path / "n.gguf").exists()
    code, output = invoke("vectors", "mix", "mixa*mixb", "-o", str(tmp_path / "n.gguf"))
    assert code == 2 and "bad mix term" in output
    code, output = invoke("vectors", "mix", "mixa*1e40", "-o", str(tmp_path / "n.gguf"))
    assert code == 2 and "too strong" in output and not (tmp_path / "n.gguf").exists()
    code, output = invoke("vectors", "mix", "mixa - mixa", "-o", str(tmp_path / "n.gguf"))
    assert code == 2 and "the mix cancels out" in output and not (tmp_path / "n.gguf").exists()
    (store / "dir.gguf").mkdir()  # listed as damaged; rm named it with files and crashed midway
    code, output = invoke("vectors", "rm", "narrow", "dir", "--yes")
    assert code == 2 and "is a folder" in output and (store / "narrow.gguf").exists()
    (store / "dir.gguf").rmdir()
    (store / "notes.txt").write_text("mine")  # was deleted: rm took any file in the store
    code, output = invoke("vectors", "rm", str(store / "notes.txt"), "--yes")
    assert code == 2 and "not a stored vector" in output and (store / "notes.txt").exists()
    (store / "notes.txt").unlink()
    code, output = invoke("vectors", "rm", "MixA", "narrow")  # not a terminal: never guess
    assert code == 2 and "add --yes" in output and "mixa.gguf" in output
    assert (store / "fp1" / "mixa.gguf").exists() and (store / "narrow.gguf").exists()
    assert invoke("vectors", "rm", "MixA", "narrow", "--yes")[0] == 0  # names ignore case
    assert not (store / "fp1" / "mixa.gguf").exists() and not (store / "narrow.gguf").exists()
    code, output = invoke("vectors", "rm", str(tmp_path / "m.gguf"))
    assert code == 2 and "not in the store" in output and (tmp_path / "m.gguf").exists()
    (store / "gone.gguf").symlink_to(tmp_path / "nowhere.gguf")  # listed; rm said "not in"
    (store / "linked.gguf").symlink_to(tmp_path / "m.gguf")
    assert invoke("vectors", "rm", "gone", "linked", "--yes")[0] == 0
    assert not (store / "gone.gguf").is_symlink() and not (store / "linked.gguf").is_symlink()
    assert (tmp_path / "m.gguf").exists()  # a link's target is not the store's to delete
    code, output = invoke("vectors", "info", "mixa")
    assert code == 2 and "no stored vector named 'mixa'" in output


def test_a_failed_write_is_one_line_and_leaves_no_file(tmp_path) -> None:
    """Writing under a file is BadInput; a GGUF whose end was lost (as gguf-py's buffered
    writes lose it on a full disk, silently) is caught by reading it back: DoesNotFit, and
    neither leaves a file behind, temporary or not."""
    vector = trained_like()
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match=r"cannot write .*v.gguf: .*file is a file, not a folder"):
        vectors.write(vector, tmp_path / "file" / "v.gguf")  # was "(File exists)"
    whole = vectors.write(vector, tmp_path / "whole.gguf").read_bytes()

    def write_truncated(tmp) -> None:
        tmp.write_bytes(whole[:-100])

    target = tmp_path / "cut.gguf"
    with pytest.raises(DoesNotFit, match=r"not written whole .*disk full"):
        files.write_atomically(target, write_truncated, check=gguffile.read_header)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "whole.gguf"]


def test_train_writes_npz_too(tiny_dense_path, tmp_path) -> None:
    code, output = invoke(
        "train",
        "happy",
        "--model",
        str(tiny_dense_path),
        "--limit",
        "8",
        "--threads",
        "1",
        "-o",
        str(tmp_path / "happy.npz"),
    )
    assert code == 0, output
    stored = vectors.read(output.split("stored ")[1].split()[0])
    copy, _ = convert.load(tmp_path / "happy.npz")
    assert copy.layers == stored.layers and copy.metadata == stored.metadata
    assert all(np.array_equal(copy.directions[n], stored.directions[n]) for n in copy.layers)


def test_info_and_list_show_the_recommended_range(edge_steer_home) -> None:
    meta = {
        "concept": "calm",
        "recommended_min": -1.5,
        "recommended_max": 2.0,
        "eval_verdict": "works",
    }
    path = vectors.write(
        vectors.ControlVector({1: np.ones(8, np.float32)}, "llama", meta),
        edge_steer_home / "vectors" / "fp2" / "rangey.gguf",
    )
    code, output = invoke("vectors", "info", str(path))
    assert code == 0 and "recommended strength -1.5 .. +2 (works)" in output
    rows = {r["name"]: r for r in json.loads(invoke("vectors", "list", "--json")[1])}
    assert rows["rangey"]["recommended"] == [-1.5, 2.0]
    assert "-1.5 .. +2" in invoke("vectors", "list")[1]
    path.unlink()


@pytest.mark.parametrize("options", [["--shift", "1"], ["--layers", "2-3"]])
def test_moving_blocks_drops_calibration_and_eval_results(tmp_path, options) -> None:
    """Was: kept, so a vector cut to two blocks still claimed the trained ±1 and range."""
    measured = {
        "concept": "calm",
        "scale_rule": "calibrated",
        "calibration_scale": 1.7,
        "calibration_budget": 1.15,
        "separations": "0,1,2,3,4",
        "recommended_min": -1.5,
        "recommended_max": 2.0,
        "eval_verdict": "works",
    }
    source = vectors.ControlVector(
        {n: np.full(8, n, np.float32) for n in (1, 2, 3, 4)}, "llama", measured
    )
    vectors.write(source, tmp_path / "calm.gguf")
    code, output = invoke(
        "vectors", "convert", str(tmp_path / "calm.gguf"), "-o", str(tmp_path / "o.gguf"), *options
    )
    assert code == 0 and "dropped the file's calibration and eval results" in output, output
    result = vectors.read(tmp_path / "o.gguf")
    assert not vectors.is_calibrated(result) and vectors.recommended_range(result) is None
    assert result.metadata["concept"] == "calm" and "scale_rule" not in result.metadata
    code, output = invoke(
        "vectors", "convert", str(tmp_path / "calm.gguf"), "-o", str(tmp_path / "same.npz")
    )
    assert code == 0 and "dropped" not in output
    assert vectors.is_calibrated(convert.load(tmp_path / "same.npz")[0])


def test_names_and_paths_print_as_they_are(edge_steer_home, tmp_path) -> None:
    """From a sweep: rich read '[...]' in a name or path as markup ('a [final].gguf' printed
    as 'a .gguf', '[/]' ended in a traceback after the file was written), and a link to
    nowhere in the store made `vectors list` crash."""
    store = edge_steer_home / "vectors"
    vectors.write(trained_like(8, (1, 2)), store / "odd[x].gguf")
    (store / "gone.gguf").symlink_to(tmp_path / "nowhere.gguf")
    try:
        code, output = invoke("vectors", "list")
        assert code == 0 and "odd[x]" in output and "gone.gguf: unreadable" in output
        code, output = invoke("vectors", "list", "--json")
        assert code == 0 and "unreadable" in output
        (tmp_path / "a[").mkdir()
        target = tmp_path / "a[/]b [final].gguf"
        code, output = invoke("vectors", "mix", "odd[x]*2", "-o", str(target))
        assert code == 0, output
        assert f"wrote {target}:" in output and target.exists()
    finally:
        (store / "odd[x].gguf").unlink()
        (store / "gone.gguf").unlink()


def test_a_files_labels_are_checked_as_the_flags_are(tmp_path) -> None:
    """From a sweep: a JSON's model_hint and metadata were stored as they came: a newline
    made a fake row in `vectors list`, and a recommended range nobody measured was shown."""
    doc = {
        "directions": {"1": [1.0, 2.0]},
        "model_hint": "llama\nEVIL",
        "metadata": {"concept": "sad\nROW", "source": "my lab", "recommended_min": -1.0},
    }
    (tmp_path / "x.json").write_text(json.dumps(doc))
    vector, notes = convert.load(tmp_path / "x.json")
    assert vector.model_hint == "" and vector.metadata == {"source": "my lab"}
    assert any("ignored model_hint" in n for n in notes)
    assert any("['concept']" in n for n in notes)
    assert any("calibration and eval" in n for n in notes)
    own = {"directions": {"1": [1.0, 2.0]}, "model_hint": "llama", "metadata": {"n": 2}}
    (tmp_path / "ok.json").write_text(json.dumps(own))
    vector, _ = convert.load(tmp_path / "ok.json")
    assert vector.model_hint == "llama" and vector.metadata == {"n": 2}
