"""Evaluation metrics as pure functions: objective, regret, mode weights, distances between sample sets."""

from __future__ import annotations

import math

import torch


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and its standard error over a 1-D tensor."""
    v = values.detach().to(torch.float64).flatten()
    n = v.numel()
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


def objective_terms(rewards: torch.Tensor, path_kls: torch.Tensor, alpha: float) -> dict[str, float]:
    """J = E[r] - alpha E[path KL] with standard errors; rewards, path_kls [B]."""
    r_mean, r_se = mean_and_stderr(rewards)
    kl_mean, kl_se = mean_and_stderr(path_kls)
    j_mean, j_se = mean_and_stderr(rewards.to(torch.float64) - alpha * path_kls.to(torch.float64))
    return {
        "reward_mean": r_mean,
        "reward_stderr": r_se,
        "path_kl": kl_mean,
        "path_kl_stderr": kl_se,
        "objective": j_mean,
        "objective_stderr": j_se,
    }


def mode_weights(assignments: torch.Tensor, num_modes: int) -> torch.Tensor:
    """Fraction of samples assigned to each mode; assignments [B] ints -> [num_modes] float64."""
    counts = torch.bincount(assignments.long().flatten(), minlength=num_modes).to(torch.float64)
    return counts / counts.sum().clamp(min=1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """TV(p, q) = 1/2 sum |p - q| for two probability vectors."""
    return float(0.5 * (p.to(torch.float64) - q.to(torch.float64)).abs().sum())


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (>= 0; 0 iff equal in law), x [n, d], y [m, d].

    Uses the unbiased (U-statistic) within-sample terms, so it can be slightly negative for equal laws.
    """
    x = x.flatten(1).to(torch.float64)
    y = y.flatten(1).to(torch.float64)
    n, m = x.shape[0], y.shape[0]
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (n * (n - 1))
    dyy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * dxy - dxx - dyy)


def log_mean_exp(values: torch.Tensor) -> tuple[float, float]:
    """log E[exp(v)] and its delta-method standard error, over a 1-D tensor of samples v."""
    v = values.to(torch.float64).flatten()
    m = v.max()
    w = torch.exp(v - m)
    mean_w = w.mean()
    se_w = w.std(unbiased=True) / math.sqrt(v.numel())
    return float(m + torch.log(mean_w)), float(se_w / mean_w)


def knn_entropy(x: torch.Tensor, k: int = 5, chunk: int = 1024) -> float:
    """Kozachenko-Leonenko estimate of the differential entropy (nats) of the law of x [n, d]:
    H = psi(n) - psi(k) + log V_d + (d/n) sum_i log eps_i, eps_i the distance to the k-th nearest neighbour and
    V_d the volume of the unit d-ball. Consistent as n grows; O(n^2) distances, computed in row chunks."""
    x = x.detach().flatten(1).to(torch.float64)
    n, d = x.shape
    if n <= k:
        raise ValueError(f"knn_entropy needs more than k={k} samples, got {n}")
    dists = []
    for start in range(0, n, chunk):
        block = torch.cdist(x[start:start + chunk], x)
        # the k+1 smallest include the point itself (distance 0)
        dists.append(block.topk(k + 1, dim=1, largest=False).values[:, k])
    eps = torch.cat(dists).clamp(min=1e-300)
    log_unit_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return float(torch.special.digamma(torch.tensor(float(n))) - torch.special.digamma(torch.tensor(float(k)))
                 + log_unit_ball + d * torch.log(eps).mean())


def sample_kl(x: torch.Tensor, log_p: torch.Tensor, k: int = 5) -> float:
    """KL(q || p) estimated from samples x [n, d] of q and the exact log p(x) [n]: -H_knn(q) - E_q[log p]."""
    return -knn_entropy(x, k) - float(log_p.detach().to(torch.float64).mean())


def spread_ratio(x: torch.Tensor, y: torch.Tensor) -> float:
    """sqrt(tr Cov(x) / tr Cov(y)) for samples x [n, d] and reference samples y [m, d]: > 1 is over-dispersed
    (wider than the reference, e.g. extra noise), < 1 under-dispersed (narrower, e.g. collapsed modes)."""
    x = x.flatten(1).to(torch.float64)
    y = y.flatten(1).to(torch.float64)
    return float((x.var(0, unbiased=True).sum() / y.var(0, unbiased=True).sum().clamp(min=1e-300)).sqrt())
