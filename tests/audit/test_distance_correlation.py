"""Distance correlation: 1 for the same data (up to a similarity transform), near 0 for independent noise."""

from __future__ import annotations

import pytest
import torch
from attack_cases import tiny_prompt

from lambdasplit.audit.attacks.distance_correlation import distance_correlation, intercepts_dcor
from lambdasplit.privacy import intercept
from lambdasplit.split import load_split


def _noise(n: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias_corrected", [True, False])
def test_same_data_scores_one(bias_corrected: bool) -> None:
    x = _noise(300, 32, 0)
    rotation, _ = torch.linalg.qr(_noise(32, 32, 1))
    assert distance_correlation(x, x, bias_corrected=bias_corrected) == pytest.approx(1.0)
    assert distance_correlation(x, 3 * x @ rotation + 1, bias_corrected=bias_corrected) == pytest.approx(1.0)


def test_independent_noise_scores_near_zero_and_dependence_does_not() -> None:
    x, y = _noise(1000, 64, 0), _noise(1000, 64, 1)
    assert distance_correlation(x, y) < 0.1
    assert distance_correlation(x[:, :8], x[:, :8] ** 2) > 0.2  # uncorrelated, yet dependent


def test_plain_estimator_is_biased_in_high_dimension() -> None:
    """Why the default is the bias-corrected estimator: the 2007 one scores independent noise high."""
    x, y = _noise(200, 576, 0), _noise(200, 576, 1)
    assert distance_correlation(x, y, bias_corrected=False) > 0.5
    assert distance_correlation(x, y) < 0.1


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="must pair rows"):
        distance_correlation(torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 4 rows"):
        distance_correlation(torch.zeros(3, 2), torch.zeros(3, 2))


def test_intercepts_embedding_uplink_scores_one(tiny_checkpoint) -> None:
    path, _ = tiny_checkpoint("llama")
    split = load_split(path, (0, 3))  # the uplink is the embedding itself
    items = [intercept(split, tiny_prompt(seed=s), max_new_tokens=2) for s in range(3)]
    assert intercepts_dcor(split, items) == pytest.approx(1.0)
    assert intercepts_dcor(split, items, max_rows=30) == pytest.approx(1.0)
    assert 0.0 <= intercepts_dcor(split, items, link="downlink") < 1.0
