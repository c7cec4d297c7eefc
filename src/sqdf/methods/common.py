"""Helpers several methods share: flattening chains into transitions, condition keys, the log-ratio convention."""

from __future__ import annotations

import torch

from ..errors import ConfigError

LOG_RATIOS = ("mean", "sum")
LOG_RATIO_HELP = (
    "unit of the per-step log-ratio log pi_theta - log pi_old that the clip bounds: 'mean' divides it by the sample's "
    "dimension d (per-dimension ratio; ddpo-pytorch's and TRL's convention, the one their clip values are set for; "
    "the bound means the same at every size); 'sum' is the transition's full log-ratio, d times larger (at SD1.5's "
    "d = 16,384 a 1e-4 bound on it clips nearly every transition after one gradient step)")


def check_log_ratio(value: str) -> None:
    if value not in LOG_RATIOS:
        raise ConfigError(f"method.log_ratio={value!r} must be one of {LOG_RATIOS} ('mean': per dimension)")


def check_pairwise_dpo(config) -> None:
    """The option checks shared by the online pairwise DPO configs (d3po, dense-dpo): an even batch of two chains
    a pair, beta > 0 or None, a label temperature >= 0 and a known log-ratio unit."""
    if config.batch_size < 2 or config.batch_size % 2:
        raise ConfigError(f"method.batch_size={config.batch_size} must be an even number >= 2 (two chains a pair)")
    if config.beta is not None and not config.beta > 0:
        raise ConfigError(f"method.beta={config.beta} must be > 0 (or None for alpha / label_temperature)")
    if not config.label_temperature >= 0:
        raise ConfigError(f"method.label_temperature={config.label_temperature} must be >= 0")
    check_log_ratio(config.log_ratio)


def step_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, dim: int, convention: str) -> torch.Tensor:
    """Per-step log-ratio in the clip's unit: (log_prob - old_log_prob) / dim for 'mean', unscaled for 'sum'.
    log_prob, old_log_prob [...] summed over a sample's ``dim`` dimensions (float64 sums: see gaussian_log_prob)."""
    diff = log_prob - old_log_prob
    return diff / dim if convention == "mean" else diff


def reference_log_ratios(policy, traj, convention: str = "sum") -> torch.Tensor:
    """log pi_theta - log pi_ref of every step taken in ``traj``, [B, T], in ``convention``'s unit ('sum' or
    'mean', see ``step_log_ratio``); differentiable in the policy, the reference's log-probs are the rollout's."""
    B, T = traj.batch_size, policy.num_steps
    chains = torch.arange(B, device=traj.states.device)
    x, x_next, k = transition_batch(traj.states, chains)
    log_probs = policy.step_log_prob(x, x_next, k, repeat_cond(traj.cond, chains, T))
    return step_log_ratio(log_probs, traj.ref_log_probs.reshape(-1), sample_dim(policy), convention).view(B, T)


def implicit_reward_weight(beta: float | None, alpha: float, policy, log_ratio: str,
                           temperature: float = 1.0) -> float:
    """``beta`` when set, else the weight on log pi_theta / pi_ref whose optimum is the task's tilted target:
    alpha / temperature for full log-ratios ('sum'), times the sample's dimension for per-dimension ones ('mean')."""
    if beta is not None:
        return beta
    scale = sample_dim(policy) if log_ratio == "mean" else 1
    return alpha / (temperature if temperature > 0 else 1.0) * scale


def sample_dim(policy) -> int:
    """Number of dimensions d of one sample of ``policy`` (its ``sample_shape``)."""
    d = 1
    for size in policy.sample_shape:
        d *= size
    return d


def condition_keys(cond: torch.Tensor | None, n: int) -> list:
    """A hashable key per sample: its condition's values (one shared key for unconditional tasks)."""
    if cond is None:
        return [None] * n
    flat = cond.detach().reshape(n, -1).cpu().tolist()
    return [tuple(row) for row in flat]


def transition_batch(states: torch.Tensor, chains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (chain, step) transition of the given chains, flattened: (x [b*T, *shape], x_next, k [b*T])."""
    sub = states[chains]
    b, t1 = sub.shape[:2]
    x = sub[:, :-1].reshape(b * (t1 - 1), *sub.shape[2:])
    x_next = sub[:, 1:].reshape(b * (t1 - 1), *sub.shape[2:])
    k = torch.arange(t1 - 1, device=states.device).repeat(b)
    return x, x_next, k


def repeat_cond(cond: torch.Tensor | None, chains: torch.Tensor, num_steps: int) -> torch.Tensor | None:
    """Conditions of the chosen chains, each repeated for its num_steps transitions."""
    return None if cond is None else cond[chains].repeat_interleave(num_steps, dim=0)
