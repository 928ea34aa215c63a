"""Plan decoding many prompts that share leading tokens: each shared run is decoded once.

Training prompts are a persona instruction followed by one of many short continuations, so
most of each prompt's tokens repeat across a dozen others (on a chat model, 33 of 41 tokens).
The engine decodes a group's shared prefix once and lets every member's sequence use its KV
cells (`llama_memory_seq_cp`), then decodes only what follows it. This module only plans:
which prompts form a group, how much of them is shared, and which groups decode together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class Group:
    """Prompts (indices) decoded on a shared prefix of `shared` tokens; each one's last token
    is never shared, so that every member decodes at least the token whose state is read."""

    members: tuple[int, ...]
    shared: int


@dataclass(frozen=True)
class Limits:
    """What one round of decodes may hold: sequences, tokens per llama_decode, KV cells."""

    sequences: int
    batch: int
    cells: int


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def groups(prompts: Sequence[Sequence[int]], limits: Limits) -> list[Group]:
    """Prompts in groups that save the most decoded tokens: in sorted order, where a group of
    k prompts sharing s tokens saves (k - 1) * s, found by dynamic programming over where
    groups end (exact, O(n^2) for n prompts). A group fits one round on its own."""
    order = sorted(range(len(prompts)), key=lambda i: tuple(prompts[i]))
    lengths = [len(prompts[i]) for i in order]
    # shareable[k]: tokens prompts order[k] and order[k+1] may share (never a last token)
    shareable = [
        min(common_length(prompts[a], prompts[b]), len(prompts[a]) - 1, len(prompts[b]) - 1)
        for a, b in pairwise(order)
    ]
    best = [0] * (len(order) + 1)  # best[j]: tokens saved by the first j prompts
    start = [0] * (len(order) + 1)  # where the last group of that best plan starts
    for j in range(1, len(order) + 1):
        best[j], start[j] = best[j - 1], j - 1  # order[j-1] alone
        shared, total = lengths[j - 1] - 1, lengths[j - 1]
        for i in range(j - 2, -1, -1):  # a group order[i..j-1]
            shared, total = min(shared, shareable[i]), total + lengths[i]
            k = j - i
            rest = total - k * shared  # tokens after the prefix, all members together
            if k > limits.sequences or rest > limits.batch or rest + shared > limits.cells:
                break  # only grows as the group grows
            if best[i] + (k - 1) * shared > best[j]:
                best[j], start[j] = best[i] + (k - 1) * shared, i
    found: list[Group] = []
    j = len(order)
    while j > 0:
        i = start[j]
        members = tuple(order[i:j])
        shared = _shared(prompts, members)
        found.append(Group(members, shared))
        j = i
    return found[::-1]


def _shared(prompts: Sequence[Sequence[int]], members: Sequence[int]) -> int:
    if len(members) == 1:
        return 0
    first = prompts[members[0]]
    return min(min(common_length(first, prompts[m]), len(prompts[m]) - 1) for m in members)


def rounds(
    found: Sequence[Group], prompts: Sequence[Sequence[int]], limits: Limits
) -> list[list[Group]]:
    """Groups packed into rounds (in order): each round decodes its groups' prefixes in one
    llama_decode and then all members' remaining tokens in another, within `limits`."""
    packed: list[list[Group]] = []
    used = _Round()
    for group in found:
        need = _Round.of(group, prompts)
        if packed and used.plus(need).fits(limits):
            packed[-1].append(group)
            used = used.plus(need)
        else:
            packed.append([group])
            used = need
    return packed


@dataclass(frozen=True)
class _Round:
    sequences: int = 0
    prefix_tokens: int = 0
    rest_tokens: int = 0

    @staticmethod
    def of(group: Group, prompts: Sequence[Sequence[int]]) -> _Round:
        rest = sum(len(prompts[m]) - group.shared for m in group.members)
        return _Round(len(group.members), group.shared, rest)

    def plus(self, other: _Round) -> _Round:
        return _Round(
            self.sequences + other.sequences,
            self.prefix_tokens + other.prefix_tokens,
            self.rest_tokens + other.rest_tokens,
        )

    def fits(self, limits: Limits) -> bool:
        return (
            self.sequences <= limits.sequences
            and self.prefix_tokens <= limits.batch
            and self.rest_tokens <= limits.batch
            and self.prefix_tokens + self.rest_tokens <= limits.cells
        )
