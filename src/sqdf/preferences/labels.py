"""Bradley-Terry labels from a reward, and the logistic (DPO) loss on implicit-reward differences.

Bradley-Terry at temperature tau: P(a > b) = sigmoid((r(a) - r(b)) / tau). DPO with weight beta on such labels has
its population optimum at p_ref exp(r / (beta tau)) / Z wherever pairs have support, which is the KL-regularized
optimum with alpha = beta tau: with tau = 1, beta = alpha makes every preference method target the tilted p* the
reward-based methods target, so regret is defined for all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_labels(r_a: torch.Tensor, r_b: torch.Tensor, temperature: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampled labels y [N] in {0, 1} (1: a won) with P(y = 1) = sigmoid((r_a - r_b) / temperature); r_a, r_b [N].
    temperature 0: the deterministic comparison (ties 0.5)."""
    if temperature < 0:
        raise ValueError(f"label temperature {temperature} must be >= 0")
    diff = (r_a - r_b).to(torch.float64)
    if temperature == 0:
        return torch.where(diff > 0, 1.0, torch.where(diff < 0, 0.0, 0.5)).to(torch.float32)
    p = torch.sigmoid(diff / temperature)
    u = torch.rand(p.shape, generator=generator, device=generator.device if generator is not None else p.device,
                   dtype=torch.float64).to(p.device)
    return (u < p).to(torch.float32)


def preference_loss(margin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-[y log sigmoid(m) + (1 - y) log sigmoid(-m)] per pair, [N]: the logistic loss of an implicit-reward margin
    m = beta (h(a) - h(b)) against labels y (1: a won, 0: b won). Ties (y = 0.5) get weight 0, as D3PO and
    Diffusion-DPO drop them; callers average over the decided pairs (``decided``)."""
    y = labels.to(margin.dtype)
    loss = -(y * F.logsigmoid(margin) + (1 - y) * F.logsigmoid(-margin))
    return torch.where(labels == 0.5, torch.zeros_like(loss), loss)


def decided(labels: torch.Tensor) -> torch.Tensor:
    """Mask [N] of pairs with a winner (label 0 or 1)."""
    return labels != 0.5
