"""Contrast datasets: concepts (persona pairs + templates), suffixes, probes and neutral text.

A control vector is the direction that separates hidden states of prompt pairs which differ
only in one concept word ("happy" vs "sad") and otherwise end identically, so the last-token
states differ by the concept alone. Built-in data lives in `edge_steer/concepts/` and ships in
the wheel; users can bring their own persona words or explicit prompt pairs (JSONL).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from .errors import BadInput, NotFound

DEFAULT_TEMPLATE = "Act as if you're extremely {persona}."
DEFAULT_BASE_TEMPLATE = "The following was written by an extremely {persona} person:\n\n"
_NOT_CONCEPTS = frozenset({"suffixes"})  # JSON files in concepts/ that are not concepts


@dataclass(frozen=True)
class Probe:
    """A held-out evaluation item: one prompt and a continuation for each pole."""

    prompt: str
    positive: str
    negative: str


@dataclass(frozen=True)
class Concept:
    """Persona words paired by index (positive[i] contrasts negative[i]) plus prompt templates."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    template: str
    base_template: str
    probes: tuple[Probe, ...] = ()
    description: str = ""
    # (positive, negative) texts that show the trait: a persona word alone gives a base
    # model little to contrast (docs/training.md)
    examples: tuple[tuple[str, str], ...] = ()
    # instruct models get them too, as the start of the reply (the trait shown in an answer,
    # not only asked for), unless measurement said otherwise for this concept
    chat_examples: bool = True


class ChatFormatter(Protocol):
    """What `contrast_pairs` needs from a model (`engine.Model` fits): its chat template."""

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str | None: ...


# -- built-in data -------------------------------------------------------------------------


def _data_dir() -> Any:
    """The packaged data folder, found through importlib so it works from a wheel or zip."""
    return resources.files("edge_steer") / "concepts"


@cache
def _concept_files() -> dict[str, Any]:
    return {
        entry.name[: -len(".json")]: entry
        for entry in _data_dir().iterdir()
        if entry.name.endswith(".json") and entry.name[: -len(".json")] not in _NOT_CONCEPTS
    }


def builtin_names() -> list[str]:
    """Names accepted by `load_builtin`, sorted, for help texts and error messages."""
    return sorted(_concept_files())


def load_builtin(name: str) -> Concept:
    """A built-in concept by name (case-insensitive); unknown names list the known ones."""
    key = name.strip().lower()
    files = _concept_files()
    if key not in files:
        raise NotFound(
            f"unknown concept {name!r}: use one of {', '.join(builtin_names())} "
            "or train it from your own persona words (train NAME --positive ... --negative ...)"
        )
    return _builtin(key)


@cache
def _builtin(key: str) -> Concept:
    entry = _concept_files()[key]
    data = json.loads(entry.read_text(encoding="utf-8"))
    concept = Concept(
        name=data["name"],
        positive=tuple(data["positive"]),
        negative=tuple(data["negative"]),
        template=data["template"],
        base_template=data["base_template"],
        probes=tuple(Probe(p["prompt"], p["positive"], p["negative"]) for p in data["probes"]),
        description=data.get("description", ""),
        examples=tuple((e["positive"], e["negative"]) for e in data.get("examples", ())),
        chat_examples=bool(data.get("chat_examples", True)),
    )
    _check_concept(concept)
    return concept


@cache
def _suffixes() -> tuple[str, ...]:
    return tuple(json.loads((_data_dir() / "suffixes.json").read_text(encoding="utf-8")))


def suffixes() -> list[str]:
    """Continuation starts: each persona pair is repeated with all of them so the direction
    reflects the concept rather than one particular sentence opening."""
    return list(_suffixes())


@cache
def neutral_text() -> str:
    """Plain factual prose, for measuring how much steering costs in fluency (perplexity)."""
    return (_data_dir() / "neutral.txt").read_text(encoding="utf-8")


@cache
def chat_questions() -> list[str]:
    """Everyday questions a chat user asks, one per line: `eval --chat` steers the replies
    to them (never the probes, which measure the same concept another way)."""
    text = (_data_dir() / "chat_questions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def persona_instruction(concept: Concept, index: int = 0) -> tuple[str, str]:
    """The positive and negative persona instruction of pair `index`, as training words
    them for instruct models ("Act as if you're extremely happy.")."""
    where = f"concept {concept.name!r} template"
    return tuple(  # type: ignore[return-value]
        _render(concept.template, words[index], where)
        for words in (concept.positive, concept.negative)
    )


@cache
def calibration_text() -> str:
    """Other neutral prose, held in: training calibrates strength on it, so that `eval`'s
    perplexity (on `neutral_text`) stays an out-of-sample measurement."""
    return (_data_dir() / "calibration.txt").read_text(encoding="utf-8")


# -- custom concepts -----------------------------------------------------------------------


def from_personas(name: str, positive: str, negative: str) -> Concept:
    """A concept from the user's words, e.g. "lazy, idle" vs "diligent, hardworking".

    Words pair up by position, so both sides need the same count.
    """
    pos, neg = _split_personas(positive), _split_personas(negative)
    if not name.strip():
        raise BadInput("the concept needs a name: pass a short name such as 'lazy'")
    if not pos or not neg:
        raise BadInput(
            "both sides of a concept need persona words, e.g. 'lazy, idle' against "
            "'diligent, hardworking'"
        )
    if len(pos) != len(neg):
        raise BadInput(
            f"{len(pos)} positive vs {len(neg)} negative persona words: give the same number "
            "on both sides (they are paired by position)"
        )
    same = [p for p, n in zip(pos, neg, strict=True) if p.casefold() == n.casefold()]
    if same:
        raise BadInput(
            f"persona word {same[0]!r} is on both sides: pair each word with its opposite"
        )
    concept = Concept(
        name=name.strip(),
        positive=pos,
        negative=neg,
        template=DEFAULT_TEMPLATE,
        base_template=DEFAULT_BASE_TEMPLATE,
        description=f"{', '.join(pos)} (+) vs {', '.join(neg)} (-)",
    )
    _check_concept(concept)
    return concept


def _split_personas(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _check_concept(concept: Concept) -> None:
    """Catch broken concept data early, with the concept's name in the message."""
    where = f"concept {concept.name!r}"
    if not concept.positive or len(concept.positive) != len(concept.negative):
        raise BadInput(f"{where}: positive and negative persona lists must be non-empty pairs")
    for field in ("template", "base_template"):
        _render(getattr(concept, field), "x", f"{where} {field}")
    for word in concept.positive + concept.negative:
        if "{" in word or "}" in word:
            raise BadInput(f"{where}: persona {word!r} contains a brace: remove it")
        if any("\ud800" <= char <= "\udfff" for char in word):  # undecodable bytes
            raise BadInput(
                f"{where}: persona {word!r} is not valid text (bytes that are not UTF-8?): "
                "check the terminal's or the file's encoding"
            )
    for pair in concept.examples:
        if not all(isinstance(text, str) and text.strip() for text in pair):
            raise BadInput(f"{where}: every example needs a non-empty positive and negative text")


def _render(template: str, persona: str, where: str) -> str:
    """Fill `{persona}`; a template without it (or with other fields) cannot contrast."""
    if "{persona}" not in template:
        raise BadInput(f"{where}: the template needs a {{persona}} placeholder")
    try:
        return template.format(persona=persona)
    except (KeyError, IndexError, ValueError) as exc:
        raise BadInput(
            f"{where}: bad template ({exc}): use only {{persona}}, write other braces as {{{{ }}}}"
        ) from None


# -- contrast pairs ------------------------------------------------------------------------


def contrast_pairs(
    concept: Concept, model: ChatFormatter, *, limit: int | None = None, seed: int = 0
) -> list[tuple[str, str]]:
    """(positive, negative) prompt texts: every persona pair x every suffix.

    Instruct models get the persona instruction as a user turn in their own chat format;
    base models (no usable template) get a plain-text preamble. Where the concept has them,
    one of its example texts that show the trait follows (rotating through them; on instruct
    models it opens the reply), so the contrast lies in text and not in one word: on
    SmolLM2-135M-Instruct `concise` moved the probes -0.46 / +1.91 nats at -1 / +1 without
    them (and the wrong way at -2), -1.66 / +2.63 with them. Both prompts of a pair share the
    suffix. The list is shuffled with `seed` (so a `limit` keeps a spread of personas and
    suffixes) and then cut to `limit`.
    """
    if limit is not None and limit < 1:
        raise BadInput(f"the number of training pairs must be at least 1, not {limit}")
    chat = _chat_prefixes(concept, model)
    heads = chat or _base_prefixes(concept)
    shows = (
        [(f"{pos} ", f"{neg} ") for pos, neg in concept.examples]
        if concept.examples and (concept.chat_examples or not chat)
        else [("", "")]
    )
    pairs = [
        (pos + shows[(i + j) % len(shows)][0] + s, neg + shows[(i + j) % len(shows)][1] + s)
        for i, (pos, neg) in enumerate(heads)
        for j, s in enumerate(_suffixes())
    ]
    random.Random(seed).shuffle(pairs)
    return pairs if limit is None else pairs[:limit]


def persona_prefixes(concept: Concept, model: ChatFormatter) -> list[tuple[str, str]]:
    """The prompt text before the suffix for each persona pair: the model's chat format, or
    the base-model preamble for all pairs if the template fails for any persona. Evaluation
    uses the first pair as the prompt-instead-of-a-vector baseline."""
    return _chat_prefixes(concept, model) or _base_prefixes(concept)


def _base_prefixes(concept: Concept) -> list[tuple[str, str]]:
    where = f"concept {concept.name!r} base_template"
    return [
        (_render(concept.base_template, p, where), _render(concept.base_template, n, where))
        for p, n in zip(concept.positive, concept.negative, strict=True)
    ]


def _chat_prefixes(concept: Concept, model: ChatFormatter) -> list[tuple[str, str]] | None:
    heads = []
    for p, n in zip(concept.positive, concept.negative, strict=True):
        pos, neg = _chat(concept, model, p), _chat(concept, model, n)
        if pos is None or neg is None:
            return None
        heads.append((pos, neg))
    return heads


def _chat(concept: Concept, model: ChatFormatter, persona: str) -> str | None:
    content = _render(concept.template, persona, f"concept {concept.name!r} template")
    return model.apply_chat_template([{"role": "user", "content": content}])


# -- user files ----------------------------------------------------------------------------


def load_pairs_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """Explicit training prompts, one {"positive": ..., "negative": ...} object per line; a
    pair given twice counts once (it would weigh twice and pass the two-pair minimum)."""
    rows = _read_jsonl(path, ("positive", "negative"), "pairs")
    return list(dict.fromkeys((row["positive"], row["negative"]) for row in rows))


def load_probes_jsonl(path: str | Path) -> list[Probe]:
    """Evaluation probes, one {"prompt": ..., "positive": ..., "negative": ...} per line."""
    rows = _read_jsonl(path, ("prompt", "positive", "negative"), "probes")
    return [Probe(row["prompt"], row["positive"], row["negative"]) for row in rows]


def _read_jsonl(path: str | Path, keys: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """Parse and check a JSONL file; every defect is a one-line BadInput with the line."""
    path = Path(path).expanduser()
    shape = "{" + ", ".join(f'"{k}": "..."' for k in keys) + "}"
    try:
        # -sig: Notepad's BOM; lines end at \n only (splitlines() would also cut a JSON
        # string at a raw U+2028 or U+0085, which json.dumps(ensure_ascii=False) writes)
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except FileNotFoundError:
        raise NotFound(f"{what} file not found: {path}: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {what} file {path} ({exc}): pass a UTF-8 JSONL file") from None
    rows = [
        _check_row(line, f"{path} line {number}", keys, shape)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]
    if not rows:
        raise BadInput(f"{path} has no {what}: write one JSON object {shape} per line")
    return rows


def _check_row(line: str, where: str, keys: tuple[str, ...], shape: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{where}: not valid JSON ({exc.msg}): write one {shape} per line") from None
    if not isinstance(row, dict):
        raise BadInput(f"{where}: expected a JSON object {shape}, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise BadInput(f'{where}: missing "{key}": each line needs {shape}')
        if not isinstance(row[key], str) or not row[key].strip():
            raise BadInput(f'{where}: "{key}" must be a non-empty string')
    check_contrast(row["positive"], row["negative"], where)
    return {key: row[key] for key in keys}


def check_contrast(positive: str, negative: str, where: str) -> None:
    """A pair's two sides must differ beyond spacing, or they teach no direction."""
    if positive.split() == negative.split():
        raise BadInput(f'{where}: "positive" and "negative" are the same text: make them contrast')
