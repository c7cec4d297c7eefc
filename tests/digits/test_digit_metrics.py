import math

import torch

from sqdf.digits.metrics import frechet_distance, gaussian_frechet, mean_pairwise_distance


def test_gaussian_frechet_matches_the_closed_form_for_diagonal_covariances():
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, -1.0, 2.0])
    va, vb = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float(((mu_a - mu_b) ** 2).sum() + (va + vb - 2 * (va * vb).sqrt()).sum())
    assert math.isclose(gaussian_frechet(mu_a, torch.diag(va), mu_b, torch.diag(vb)), expected, rel_tol=1e-9)


def test_gaussian_frechet_with_rotated_full_covariances():
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) @ q.T
    # commuting covariances (same eigenvectors): tr sqrt term = sum sqrt(l_a l_b)
    b = q @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ q.T
    expected = 10 + 10 - 2 * (2 + math.sqrt(6) + math.sqrt(6) + 2)
    assert math.isclose(gaussian_frechet(torch.zeros(4), a, torch.zeros(4), b), expected, rel_tol=1e-9)
    assert abs(gaussian_frechet(torch.ones(4), a, torch.ones(4), a)) < 1e-9


def test_frechet_distance_of_samples_converges_and_needs_two_points():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64) * 2 + torch.tensor([3.0, 0.0], dtype=torch.float64)
    # closed form: 9 + 2 * (1 + 4 - 2 * 2) = 11
    assert abs(frechet_distance(x, y) - 11.0) < 0.3
    try:
        frechet_distance(x[:1], y)
    except ValueError as exc:
        assert "2 samples" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_mean_pairwise_distance_by_hand():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert math.isclose(mean_pairwise_distance(pts), (5 + 4 + 3) / 3, rel_tol=1e-9)
    assert math.isnan(mean_pairwise_distance(pts[:1]))
