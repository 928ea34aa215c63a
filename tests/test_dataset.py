"""Built-in concept data, contrast-pair construction and the JSONL loaders."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from edge_steer import dataset
from edge_steer.dataset import Concept, Probe
from edge_steer.errors import BadInput, NotFound

REQUIRED = ("lazy", "happy", "honest", "creative", "confident", "formal", "trippy", "concise")


@pytest.fixture(scope="module")
def demo_model():
    from edge_steer import engine, model_files

    model = engine.Model(model_files.resolve_model("demo"))
    yield model
    model.close()


class ChatStub:
    """An instruct model's template, without llama.cpp: enough for `contrast_pairs`."""

    def __init__(self, refuse: str | None = None):
        self.refuse = refuse  # content substring for which the template "fails" ("" = all)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str | None:
        (message,) = messages
        if self.refuse is not None and self.refuse in message["content"]:
            return None
        return f"<user>{message['content']}</user>\n<assistant>\n"


def words(text: str) -> int:
    return len(text.split())


def base_prompts(concept: Concept) -> list[str]:
    return [p for pair in dataset.contrast_pairs(concept, ChatStub(refuse="")) for p in pair]


# -- built-in data -------------------------------------------------------------------------


def test_builtin_names_cover_required_and_skip_data_files():
    names = dataset.builtin_names()
    assert set(REQUIRED) <= set(names)
    assert "suffixes" not in names
    assert names == sorted(names)


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_concept_is_well_formed(name):
    concept = dataset.load_builtin(name)
    assert concept.name == name
    assert concept.description
    assert len(concept.positive) == len(concept.negative) >= 6
    assert len(set(concept.positive + concept.negative)) == 2 * len(concept.positive)
    assert "{persona}" in concept.template and "{persona}" in concept.base_template
    assert len(concept.probes) >= 12
    assert len({p.prompt for p in concept.probes}) == len(concept.probes)
    for probe in concept.probes:
        assert probe.prompt.strip() and not probe.prompt.endswith(" "), probe
        assert probe.positive != probe.negative
        for text in (probe.positive, probe.negative):
            assert text.startswith(" ") and not text.startswith("  "), probe
            assert 5 <= words(text) <= 15, probe
        if name != "concise":  # for concise, length *is* the concept
            assert abs(words(probe.positive) - words(probe.negative)) <= 4, probe


@pytest.mark.parametrize("name", REQUIRED)
def test_probes_never_appear_in_training_prompts(name):
    concept = dataset.load_builtin(name)
    chat = [p for pair in dataset.contrast_pairs(concept, ChatStub()) for p in pair]
    training = "\n".join(base_prompts(concept) + chat).lower()
    suffixes = {s.lower() for s in dataset.suffixes()}
    for probe in concept.probes:
        assert probe.prompt.lower() not in suffixes
        for text in (probe.prompt, probe.positive.strip(), probe.negative.strip()):
            assert text.lower() not in training, (name, text)


def test_load_builtin_is_case_insensitive_and_rejects_unknown_names():
    assert dataset.load_builtin(" Happy ") == dataset.load_builtin("happy")
    with pytest.raises(NotFound) as err:
        dataset.load_builtin("grumpy")
    message = str(err.value)
    assert "grumpy" in message and "\n" not in message
    assert all(name in message for name in REQUIRED)
    with pytest.raises(NotFound):
        dataset.load_builtin("../suffixes")
    with pytest.raises(NotFound):
        dataset.load_builtin("suffixes")


def test_suffixes_are_many_short_and_distinct():
    suffixes = dataset.suffixes()
    assert len(suffixes) >= 64
    assert len(set(suffixes)) == len(suffixes)
    assert all(1 <= words(s) <= 8 and s == s.strip() for s in suffixes)
    suffixes.append("mutating the copy")
    assert "mutating the copy" not in dataset.suffixes()


def test_neutral_text_mixes_kinds_of_text_first():
    """eval scores the first 768 tokens: they must hold a story, a dialogue, instructions,
    news and a letter besides explanations, in calm words."""
    text = dataset.neutral_text()
    assert 1000 <= words(text) <= 1600
    first = text.split("\n\n")[:6]
    assert any('"' in p for p in first)  # dialogue
    assert any(p.startswith("Dear ") for p in first)  # a letter
    assert any(p.startswith("To ") for p in first)  # instructions
    assert sum(words(p) for p in first) < 600  # about 740 tokens on Gemma: inside the 768
    assert "!" not in text


# -- custom concepts -----------------------------------------------------------------------


def test_from_personas_splits_and_pairs_words():
    concept = dataset.from_personas("lazy2", "lazy, idle ,", " diligent,hardworking")
    assert concept.positive == ("lazy", "idle")
    assert concept.negative == ("diligent", "hardworking")
    assert concept.template == dataset.DEFAULT_TEMPLATE
    assert concept.base_template == dataset.DEFAULT_BASE_TEMPLATE
    assert concept.probes == ()
    assert "lazy" in concept.description and "diligent" in concept.description


@pytest.mark.parametrize(
    ("name", "positive", "negative", "expected"),
    [
        ("x", "lazy, idle", "diligent", "same number"),
        ("x", " , ", "diligent", "persona words"),
        ("x", "lazy", "", "persona words"),
        ("  ", "lazy", "diligent", "name"),
        ("x", "la{zy", "diligent", "brace"),
        ("x", "happy, calm", "sad, Calm", "'calm' is on both sides"),
        ("x", "caf\udce9", "tea", "not valid text"),  # a terminal's Latin-1 byte, undecoded
    ],
)
def test_from_personas_rejects_bad_input(name, positive, negative, expected):
    with pytest.raises(BadInput, match=expected) as err:
        dataset.from_personas(name, positive, negative)
    assert "\n" not in str(err.value)


# -- contrast pairs ------------------------------------------------------------------------


def split_pair(concept: Concept, pos: str, neg: str, render) -> tuple[int, str]:
    """Which persona pair and suffix produced (pos, neg); fails if they differ otherwise."""
    for i, (p, n) in enumerate(zip(concept.positive, concept.negative, strict=True)):
        head_p, head_n = render(p), render(n)
        if pos.startswith(head_p) and neg.startswith(head_n):
            suffix = pos[len(head_p) :]
            if neg[len(head_n) :] == suffix:
                return i, suffix
    raise AssertionError(f"not a persona-only contrast: {pos!r} vs {neg!r}")


def test_contrast_pairs_on_base_model_differ_only_in_persona(demo_model):
    concept = dataset.load_builtin("happy")
    assert demo_model.apply_chat_template([{"role": "user", "content": "hi"}]) is None
    pairs = dataset.contrast_pairs(concept, demo_model)
    suffixes = dataset.suffixes()
    assert len(pairs) == len(concept.positive) * len(suffixes)
    assert len(set(pairs)) == len(pairs)
    seen = {
        split_pair(concept, p, n, lambda w: concept.base_template.format(persona=w))
        for p, n in pairs
    }
    assert seen == {(i, s) for i in range(len(concept.positive)) for s in suffixes}


def test_base_model_pairs_show_the_trait_in_text(demo_model):
    """Concepts with examples: each base-model pair is persona preamble + one example of its
    own pole + the shared suffix; every example is used, and pairs stay paired by index."""
    concept = dataset.load_builtin("honest")
    assert len(concept.examples) >= 8
    pairs = dataset.contrast_pairs(concept, demo_model)
    used = set()
    for pos, neg in pairs:
        found = [
            k
            for k, (ep, en) in enumerate(concept.examples)
            if f"\n\n{ep} " in pos and f"\n\n{en} " in neg
        ]
        assert len(found) == 1, (pos, neg)
        used.add(found[0])
        assert (
            pos.rsplit(concept.examples[found[0]][0], 1)[1]
            == neg.rsplit(concept.examples[found[0]][1], 1)[1]
        )  # the same suffix
    assert used == set(range(len(concept.examples)))


def test_contrast_pairs_end_on_the_same_token(demo_model):
    """The trainer reads the last token's state: it must be the shared suffix's last token."""
    for name in REQUIRED:
        for pos, neg in dataset.contrast_pairs(dataset.load_builtin(name), demo_model, limit=40):
            tp, tn = demo_model.tokenize(pos), demo_model.tokenize(neg)
            assert tp[-1] == tn[-1], (pos, neg)
            assert len(tp) < 96


def test_contrast_pairs_are_deterministic_per_seed(demo_model):
    concept = dataset.load_builtin("happy")  # no examples: pairs differ in the persona only
    first = dataset.contrast_pairs(concept, demo_model, seed=3)
    assert first == dataset.contrast_pairs(concept, demo_model, seed=3)
    assert first != dataset.contrast_pairs(concept, demo_model, seed=4)
    assert sorted(first) == sorted(dataset.contrast_pairs(concept, demo_model, seed=4))
    cut = dataset.contrast_pairs(concept, demo_model, seed=3, limit=50)
    assert cut == first[:50]
    assert (
        len(
            {
                split_pair(concept, p, n, lambda w: concept.base_template.format(persona=w))[0]
                for p, n in cut
            }
        )
        > 1
    )  # a limit still spreads over persona pairs
    with pytest.raises(BadInput, match="at least 1"):
        dataset.contrast_pairs(concept, demo_model, limit=0)


def test_contrast_pairs_use_the_chat_template_for_instruct_models():
    concept = dataset.load_builtin("formal")
    stub = ChatStub()
    pairs = dataset.contrast_pairs(concept, stub, limit=100, seed=1)
    assert len(pairs) == 100
    for pos, neg in pairs:
        assert pos.startswith("<user>Act as if you're extremely ")
        _, suffix = split_pair(
            concept,
            pos,
            neg,
            lambda w: stub.apply_chat_template(
                [{"role": "user", "content": concept.template.format(persona=w)}]
            ),
        )
        assert suffix in dataset.suffixes()


def test_instruct_pairs_open_the_reply_with_an_example_where_the_concept_allows():
    """On instruct models the example follows the persona turn (the reply shows the trait);
    a concept with "chat_examples": false (honest) keeps the reply to the suffix alone."""
    stub = ChatStub()
    concise = dataset.load_builtin("concise")
    for pos, neg in dataset.contrast_pairs(concise, stub, limit=40):
        shown = [k for k, (ep, en) in enumerate(concise.examples) if f"{ep} " in pos]
        assert len(shown) == 1 and f"{concise.examples[shown[0]][1]} " in neg, (pos, neg)
    honest = dataset.load_builtin("honest")
    assert honest.examples and not honest.chat_examples
    for pos, _ in dataset.contrast_pairs(honest, stub, limit=40):
        assert not any(ep in pos for ep, _ in honest.examples)


def test_contrast_pairs_fall_back_to_base_format_when_any_persona_fails():
    concept = dataset.load_builtin("happy")
    pairs = dataset.contrast_pairs(concept, ChatStub(refuse="gloomy"))
    assert all(p.startswith("The following was written by") for pair in pairs for p in pair)


# -- JSONL files ---------------------------------------------------------------------------


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_pairs_jsonl_reads_pairs_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path,
        json.dumps({"positive": "I am happy.", "negative": "I am sad.", "note": "extra ok"}),
        "",
        "   ",
        json.dumps({"positive": "Joy", "negative": "Grief"}),
    )
    assert dataset.load_pairs_jsonl(path) == [("I am happy.", "I am sad."), ("Joy", "Grief")]
    assert dataset.load_pairs_jsonl(str(path)) == dataset.load_pairs_jsonl(path)


def test_load_probes_jsonl_keeps_leading_spaces(tmp_path):
    row = {"prompt": "My day was", "positive": " great fun.", "negative": " dull and sad."}
    path = write_lines(tmp_path, json.dumps(row))
    assert dataset.load_probes_jsonl(path) == [Probe("My day was", " great fun.", " dull and sad.")]


GOOD_PAIR = json.dumps({"positive": "a", "negative": "b"})


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ((GOOD_PAIR, '{"positive": "a", "negative": '), r"line 2: not valid JSON"),
        (('["a", "b"]',), r"line 1: expected a JSON object"),
        (('{"positive": "a"}',), r'line 1: missing "negative"'),
        (('{"postive": "a", "negative": "b"}',), r'line 1: missing "positive"'),
        ((GOOD_PAIR, "", '{"positive": "  ", "negative": "b"}'), r'line 3: "positive" must be'),
        (('{"positive": 3, "negative": "b"}',), r'"positive" must be a non-empty string'),
        (('{"positive": "same", "negative": "same"}',), r"the same text"),
        (('{"positive": "I love food.", "negative": "I love food. "}',), r"the same text"),
        (("", "  "), r"has no pairs"),
    ],
)
def test_load_pairs_jsonl_rejects_defects(tmp_path, lines, expected):
    path = write_lines(tmp_path, *lines)
    with pytest.raises(BadInput, match=expected) as err:
        dataset.load_pairs_jsonl(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_load_pairs_jsonl_reads_a_bom_and_counts_a_repeated_pair_once(tmp_path):
    """Windows Notepad starts UTF-8 files with a BOM; a pair given twice would weigh twice
    (and twenty copies of one pair would pass the two-pair minimum)."""
    path = tmp_path / "pairs.jsonl"
    other = json.dumps({"positive": "c", "negative": "d"})
    path.write_text("\n".join([GOOD_PAIR, GOOD_PAIR, other, GOOD_PAIR]), encoding="utf-8-sig")
    assert dataset.load_pairs_jsonl(path) == [("a", "b"), ("c", "d")]


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw inside strings; they cut
    the line there ("Unterminated string"). Windows line ends still read."""
    rows = [("happy\u2028today", "sad\u2028today"), ("joy\x85ful", "gloom\x85y")]
    lines = [json.dumps({"positive": a, "negative": b}, ensure_ascii=False) for a, b in rows]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8", newline="")
    assert dataset.load_pairs_jsonl(path) == rows


def test_load_pairs_jsonl_rejects_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(NotFound, match="not found"):
        dataset.load_pairs_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BadInput, match="has no pairs"):
        dataset.load_pairs_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput, match="UTF-8"):
        dataset.load_pairs_jsonl(tmp_path / "bin.jsonl")
    with pytest.raises(BadInput, match="cannot read"):
        dataset.load_pairs_jsonl(tmp_path)  # a directory


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"positive": " a", "negative": " b"}, 'missing "prompt"'),
        ({"prompt": "", "positive": " a", "negative": " b"}, '"prompt" must be'),
        ({"prompt": "p", "positive": " a", "negative": " a"}, "the same text"),
    ],
)
def test_load_probes_jsonl_rejects_defects(tmp_path, row, expected):
    path = write_lines(tmp_path, json.dumps(row))
    with pytest.raises(BadInput, match=expected):
        dataset.load_probes_jsonl(path)
    with pytest.raises(BadInput, match="has no probes"):
        dataset.load_probes_jsonl(write_lines(tmp_path, ""))
