"""Near-duplicate distance between prompts, in words: the held-out rule of issue 22.

Two prompts are too close when one becomes the other in at most MAX_EDITS word edits
(insert, delete or replace a word), or when their word sets overlap with Jaccard >= MAX_JACCARD.
Words are runs of letters and digits, lowercased ("What's 2+2?" -> what, s, 2, 2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MAX_EDITS = 2
MAX_JACCARD = 0.5
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The lowercased words of a prompt, in order."""
    return _WORD.findall(text.lower())


def word_edits(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences."""
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def jaccard(a: Sequence[str], b: Sequence[str]) -> float:
    """|A & B| / |A | B| of the two word sets (1.0 for two empty prompts)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def too_close(a: str, b: str) -> bool:
    """True when prompts a and b break the rule (<= MAX_EDITS word edits or Jaccard >= MAX_JACCARD)."""
    wa, wb = words(a), words(b)
    return word_edits(wa, wb) <= MAX_EDITS or jaccard(wa, wb) >= MAX_JACCARD


@dataclass(frozen=True)
class Clash:
    """Prompt i (of the checked list) is too close to prompt j (of the reference list)."""
    i: int
    j: int
    edits: int
    jaccard: float


def clashes(prompts: Sequence[str], reference: Sequence[str] | None = None) -> list[Clash]:
    """Every pair breaking the rule: prompts x reference, or pairs i < j within prompts alone.

    Vectorised: word-set intersections come from one matrix product; the exact word edits are
    computed only where they can be <= MAX_EDITS (each edit changes at most one word on each
    side of the set difference, and the lengths by at most one).
    """
    within = reference is None
    reference = prompts if within else reference
    seq_a, seq_b = [words(p) for p in prompts], [words(p) for p in reference]
    sets_a, sets_b = [set(w) for w in seq_a], [set(w) for w in seq_b]
    vocab = {w: n for n, w in enumerate(sorted(set().union(*sets_a, *sets_b)))}
    a, b = _incidence(sets_a, vocab), _incidence(sets_b, vocab)
    inter = a @ b.T
    size_a, size_b = a.sum(1)[:, None], b.sum(1)[None, :]
    union = size_a + size_b - inter
    jac = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
    len_a = np.array([len(w) for w in seq_a])[:, None]
    len_b = np.array([len(w) for w in seq_b])[None, :]
    maybe_edits = ((size_a - inter <= MAX_EDITS) & (size_b - inter <= MAX_EDITS)
                   & (np.abs(len_a - len_b) <= MAX_EDITS))
    candidates = (jac >= MAX_JACCARD) | maybe_edits
    if within:
        candidates &= np.triu(np.ones_like(candidates, dtype=bool), k=1)
    found = []
    for i, j in zip(*np.nonzero(candidates)):
        edits = word_edits(seq_a[i], seq_b[j])
        if edits <= MAX_EDITS or jac[i, j] >= MAX_JACCARD:
            found.append(Clash(int(i), int(j), edits, float(jac[i, j])))
    return found


def _incidence(sets: list[set[str]], vocab: dict[str, int]) -> np.ndarray:
    matrix = np.zeros((len(sets), len(vocab)), dtype=np.float32)
    for row, ws in enumerate(sets):
        matrix[row, [vocab[w] for w in ws]] = 1.0
    return matrix


def rule_violations(prompts: Sequence[str], training: Sequence[str]) -> list[str]:
    """One line per pair breaking the rule: a prompt too close to a training prompt, or two
    prompts too close to each other. Empty when the prompts are fit to evaluate on."""
    lines = [f"too close to a training prompt ({c.edits} word edits, Jaccard {c.jaccard:.2f}): "
             f"{prompts[c.i]!r} ~ {training[c.j]!r}" for c in clashes(prompts, training)]
    lines += [f"too close to each other ({c.edits} word edits, Jaccard {c.jaccard:.2f}): "
              f"{prompts[c.i]!r} ~ {prompts[c.j]!r}" for c in clashes(prompts)]
    return lines
