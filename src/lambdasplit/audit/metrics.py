"""Scores for what an attack recovered against the ground truth: token ids, or decoded text for secrets.

Token accuracy and ROUGE-L are the figures inversion papers report (e.g. "Text Embeddings Reveal (Almost) As
Much As Text", Morris et al., 2023; ROUGE-L from Lin, 2004). Each errs toward crediting the attacker where a
choice was open, so a weak score cannot come from the scoring alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def token_accuracy(recovered: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of ``target`` positions holding the same id in ``recovered`` (a missing position is wrong).

    Extra recovered tokens past the end of ``target`` are not counted. An empty target scores 1.0 only
    against an empty recovery.
    """
    if not target:
        return 1.0 if not recovered else 0.0
    return sum(r == t for r, t in zip(recovered, target, strict=False)) / len(target)


def find_span(haystack: Sequence[int], needle: Sequence[int]) -> slice | None:
    """Where ``needle`` first occurs in ``haystack`` as a contiguous run (None if it does not, or is empty)."""
    n = len(needle)
    if n == 0:
        return None
    for i in range(len(haystack) - n + 1):
        if list(haystack[i : i + n]) == list(needle):
            return slice(i, i + n)
    return None


def _lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence: the classic O(len(a) * len(b)) table, one row at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(recovered: Sequence[int], target: Sequence[int]) -> float:
    """ROUGE-L F1 over token ids: the LCS's harmonic mean of precision and recall (1.0 when both are empty)."""
    if not recovered or not target:
        return 1.0 if not recovered and not target else 0.0
    lcs = _lcs_length(recovered, target)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(recovered), lcs / len(target)
    return 2 * precision * recall / (precision + recall)


def exact(recovered: Sequence[int], target: Sequence[int]) -> bool:
    """Every token recovered, in order, and nothing more."""
    return list(recovered) == list(target)


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def secret_recovered(recovered_text: str, secret: str, *, ignore_case: bool = False) -> bool:
    """Whether ``secret`` appears in the recovered text (runs of whitespace compared as one space).

    Raises ``ValueError`` for a secret that is empty or only whitespace (it would always be "found").
    """
    needle = _squash(secret)
    if not needle:
        raise ValueError(f"secret must contain a non-whitespace character, got {secret!r}")
    haystack = _squash(recovered_text)
    if ignore_case:
        needle, haystack = needle.casefold(), haystack.casefold()
    return needle in haystack
