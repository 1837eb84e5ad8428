"""The chi-square test the sampling tests share: observed counts of outputs against their exact probabilities."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping

import torch


def chi_square_p(counts: Counter[Hashable], exact: Mapping[Hashable, float], samples: int) -> float:
    """The p-value of ``counts`` (``samples`` draws) under the distribution ``exact``; the rarest outcomes are pooled
    until every bin expects at least 5 draws, so the chi-square approximation holds."""
    assert set(counts) <= set(exact), set(counts) - set(exact)
    keys = sorted(exact, key=exact.__getitem__)
    observed = [float(counts[key]) for key in keys]
    expected = [exact[key] * samples for key in keys]
    while len(expected) > 1 and expected[0] < 5:
        observed[1] += observed.pop(0)
        expected[1] += expected.pop(0)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))  # chi2 survival
