"""Continuous-time sampling of a VP diffusion: the score as the action of a reverse SDE.

Time. Continuous time is the training-timestep axis ``t`` in [0, N-1] of the policy's VP schedule
(``alphas_cumprod`` = abar, float64 [N]). ``lambda(t) = log abar(t)`` is linear between integer timesteps, so
``beta(t) = -d lambda / dt`` is piecewise constant and the integral of beta over a step from ``t_k`` down to
``t_{k+1}`` (integers, t_k > t_{k+1}) is exactly

    B_k = log abar(t_{k+1}) - log abar(t_k) > 0          (dimensionless; ``vp_increments``).

The forward SDE ``dx = -1/2 beta x dt + sqrt(beta) dW`` has the schedule's marginals at every integer t
(mean scaled by sqrt(abar(t)/abar(s)), variance relaxed toward 1 at rate beta). Its reverse, run from t_0 = N-1
down to 0 in the reversed time s = -t, with the score as the action ``a(t, x) = grad log p_t(x)``
(= -eps_hat / sqrt(1 - abar_t) for an epsilon network), is

    dx = [1/2 beta x + beta a(t, x)] ds + sqrt(beta) dW        (g^2 = beta).

Solvers on a descending integer grid t_0 > ... > t_T (``spaced_timesteps`` or ``random_timesteps``), each step
with its own noise z_k ~ N(0, I):

- ``em`` (Euler-Maruyama): x' = x + 1/2 B_k x + B_k a(t_k, x) + sqrt(B_k) z_k. Each step is the Gaussian
  N(x + 1/2 B_k x + B_k a, B_k I), so per-step log-probs are exact, and the KL of one step between two score
  functions is exactly (1/2) B_k ||a_theta - a_ref||^2 (equal covariances; the mean gap is B_k times the action
  gap). The path KL of the EM chain is their sum: the left Riemann sum of Girsanov's
  (1/2) int g^2 ||a_theta - a_ref||^2 dt. That is ``girsanov_kl``, exact for EM paths, not an approximation.
- ``heun`` (second-order stochastic Heun, additive noise): predictor x~ = the EM step with z_k; corrector
  x' = x + 1/2 (D(t_k, x) + D(t_{k+1}, x~)) + sqrt(B_k) z_k with the B-weighted drift D(t, y) = 1/2 B_k y + B_k a(t, y).
- ``ode-euler`` / ``ode-heun``: the probability-flow ODE dx/ds = 1/2 beta x + 1/2 beta a(t, x), with Euler and
  Heun steps (drift D(t, y) = 1/2 B_k y + 1/2 B_k a(t, y), no noise). Same marginals as the SDE in the limit.

The final step. The Heun corrector needs a(t_{k+1}, x~) at the end of the step. On the final step the end is the
lowest noise level, t = 0 on a full grid, where sqrt(1 - abar(0)) is about 0.01 (linear schedule): in eps form the
corrector's drift is B a = -B eps(x~, 0) / sqrt(1 - abar(0)), i.e. the network's eps error at its least-trained,
nearly-clean level amplified by B / 0.01, and the step is stiff (for data of small variance the score's
Lipschitz constant there is about 1 / (1 - abar(0)) = 10^4, while x~ still carries the step's sqrt(B) z noise, so
the corrector can remove more noise than the step injected). Both Heun solvers therefore take the plain Euler
(EM) step on the final step of the grid by default, as EDM skips its corrector on the last step;
``final_corrector=True`` keeps the corrector there (well defined whenever abar(t_T) < 1: the eps form is finite).

KL along other solvers. Heun steps are not Gaussian in x' and ODE steps are deterministic, so their paths have no
exact step KL. For them ``path_kl`` is the same Girsanov sum sum_k (1/2) B_k ||a_theta - a_ref||^2 at the states
x_k the solver visits: a Riemann estimate of the KL between the policy's and the reference's *SDE* path
measures (the integrand depends on (t, x_t) only, and the ODE and SDE share their time marginals in the limit),
not a KL of the ODE sampler itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .schedule import NoiseSchedule, spaced_timesteps, validate_timesteps

SOLVERS = ("em", "heun", "ode-euler", "ode-heun")


# ---- pure math -------------------------------------------------------------------------------------------------
def vp_increments(alphas_cumprod: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
    """B_k = log abar(t_{k+1}) - log abar(t_k) = integral of beta over step k, [T] float64 (> 0 on a descending
    grid). alphas_cumprod [N]; timesteps: T + 1 descending integers."""
    log_abar = torch.log(alphas_cumprod.to(torch.float64))[torch.tensor(timesteps, dtype=torch.long)]
    return log_abar[1:] - log_abar[:-1]


def _per_state(values: torch.Tensor, like: torch.Tensor, lead: int) -> torch.Tensor:
    """values [*lead dims] reshaped to broadcast against like [*lead dims, *shape], in like's dtype/device."""
    return values.to(like.device, like.dtype).reshape(*values.shape, *([1] * (like.ndim - lead)))


def em_mean(x: torch.Tensor, score: torch.Tensor, increment) -> torch.Tensor:
    """Mean of one EM step, x + 1/2 B x + B a. x, score [n, *shape]; increment B a float or [n]."""
    b = torch.as_tensor(increment, dtype=torch.float64)
    b = _per_state(b.expand(x.shape[0]) if b.ndim == 0 else b, x, 1)
    return x + 0.5 * b * x + b * score


def girsanov_step_kl(score: torch.Tensor, ref_score: torch.Tensor, increment) -> torch.Tensor:
    """(1/2) B ||a - a_ref||^2 summed over sample dims: the exact KL of one EM step between two scores, [n].
    score, ref_score [n, *shape]; increment B a float or [n]."""
    b = torch.as_tensor(increment, dtype=torch.float64).to(score.device, score.dtype)
    return 0.5 * b * ((score - ref_score) ** 2).flatten(1).sum(1)


def girsanov_kl(scores: torch.Tensor, ref_scores: torch.Tensor, increments: torch.Tensor) -> torch.Tensor:
    """Path KL sum_k (1/2) B_k ||a_k - a_ref,k||^2 along n paths, [n].

    scores, ref_scores [n, T, *shape] (actions at the visited states x_k, t_k); increments B_k [T] or [n, T].
    For Euler-Maruyama paths this is exactly KL(EM path of a || EM path of a_ref) (a sum of exact Gaussian step
    KLs); it is the left Riemann sum of Girsanov's (1/2) int g^2 ||a - a_ref||^2 dt with g^2 = beta.
    """
    b = increments.to(scores.device, scores.dtype)
    sq = ((scores - ref_scores) ** 2).flatten(2).sum(-1)  # [n, T]
    return (0.5 * b * sq).sum(1)


def em_log_ratio(noise: torch.Tensor, score: torch.Tensor, old_score: torch.Tensor,
                 increments: torch.Tensor) -> torch.Tensor:
    """log pi_new(x'|x) - log pi_old(x'|x) of EM steps taken by the old policy with noise z, [*lead].

    With x' = x + 1/2 B x + B a_old + sqrt(B) z and delta = a_new - a_old:
    log ratio = sqrt(B) z . delta - (1/2) B ||delta||^2 (no cancellation of large log-densities).
    noise, score, old_score [n, T, *shape]; increments [T] or [n, T]. Returns [n, T].
    """
    b = increments.to(score.device, score.dtype)
    delta = score - old_score
    cross = (noise * delta).flatten(2).sum(-1)
    return b.sqrt() * cross - 0.5 * b * (delta**2).flatten(2).sum(-1)


def terminal_tweedie(x: torch.Tensor, score: torch.Tensor, abar_t: torch.Tensor, abar_end: float) -> torch.Tensor:
    """E[x_end | x_t] for the forward SDE started at the final level t_end (abar_end = abar(t_end)):
    with rho = abar_t / abar_end, x_t = sqrt(rho) x_end + sqrt(1 - rho) eps, so Tweedie gives
    (x_t + (1 - rho) grad log p_t(x_t)) / sqrt(rho); equals x_t at t = t_end. x, score [n, *shape]; abar_t [n]."""
    rho = _per_state(abar_t.to(torch.float64) / abar_end, x, 1)
    return (x + (1 - rho) * score) / rho.sqrt()


def random_timesteps(num_train_steps: int, num_steps: int, generator: torch.Generator | None = None) -> list[int]:
    """A jittered grid of T + 1 = num_steps + 1 strictly decreasing integers from N-1 to 0.

    Each interior point is drawn uniformly from the integers of its own stratum around the evenly spaced grid
    point (strata between midpoints of ``spaced_timesteps``; disjoint, so the grid stays strictly decreasing).
    Randomness comes from ``generator`` (any device); the endpoints are fixed.
    """
    grid = spaced_timesteps(num_train_steps, num_steps)
    if num_steps < 2:
        return grid
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(num_steps - 1, generator=generator, device=device, dtype=torch.float64).cpu().tolist()
    out = [grid[0]]
    for i in range(1, num_steps):
        lo = (grid[i] + grid[i + 1]) // 2 + 1
        hi = (grid[i - 1] + grid[i]) // 2
        out.append(min(hi, lo + int(u[i - 1] * (hi - lo + 1))))
    out.append(grid[-1])
    return out


# ---- samplers --------------------------------------------------------------------------------------------------
@dataclass
class SDESample:
    """n paths of a continuous-time solver on the grid ``timesteps`` (T + 1 ints).

    states [n, T+1, *shape] (states[:, -1] is the sample at t_T); increments B_k [T] float64;
    scores [n, T, *shape]: the sampling network's action a(t_k, x_k) (what the step used first);
    ref_scores [n, T, *shape] (with_kl) the reference's; noises z_k [n, T, *shape] (SDE solvers, else None);
    step_kls [n, T] (with_kl): (1/2) B_k ||a_policy - a_ref||^2 at x_k; log_probs [n, T] (EM only):
    log N(x_{k+1}; EM mean, B_k I) of the taken steps.
    """

    states: torch.Tensor
    cond: torch.Tensor | None
    timesteps: list[int]
    increments: torch.Tensor
    solver: str
    scores: torch.Tensor
    ref_scores: torch.Tensor | None = None
    noises: torch.Tensor | None = None
    step_kls: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None

    @property
    def samples(self) -> torch.Tensor:
        return self.states[:, -1]

    @property
    def path_kl(self) -> torch.Tensor | None:
        """Girsanov sum along each path, [n]: the exact path KL for EM, a Riemann estimate of the SDE path KL for
        the other solvers (see the module docstring); None without with_kl."""
        return None if self.step_kls is None else self.step_kls.sum(1)


def check_vp(policy) -> NoiseSchedule:
    """The policy's schedule, or a ConfigError when it is not a VP ``NoiseSchedule``."""
    schedule = policy.schedule
    if not isinstance(schedule, NoiseSchedule):
        raise ConfigError(f"continuous-time SDE sampling supports VP schedules (NoiseSchedule); this policy has a "
                          f"{type(schedule).__name__}; use a VP task or a discrete-time method")
    return schedule


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ConfigError(f"solver={solver!r} is not one of {SOLVERS}")
    return solver


@torch.no_grad()
def sample_sde(
    policy,
    n: int,
    cond: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    timesteps: list[int] | None = None,
    solver: str = "em",
    which: str = "policy",
    with_kl: bool = True,
    final_corrector: bool = False,
) -> SDESample:
    """Sample n paths of the reverse VP SDE (or its probability-flow ODE) with the chosen network's score.

    Args:
        policy: a ``DiffusionPolicy`` with a VP schedule (``score_at`` gives a(t, x) at any integer t).
        timesteps: descending integer training timesteps t_0 > ... > t_T (None: the policy's own grid).
        solver: "em", "heun", "ode-euler" or "ode-heun" (module docstring).
        which: the network that drives the sampler, "policy" or "reference".
        with_kl: also evaluate the other network's score at every x_k and record step_kls / ref_scores.
        final_corrector: Heun solvers only: keep the corrector on the final step (default: Euler there).

    Randomness (start noise x_{t_0} ~ N(0, I), then one z_k per SDE step) comes from ``generator``.
    """
    check_solver(solver)
    schedule = check_vp(policy)
    ts = validate_timesteps(schedule.timesteps if timesteps is None else timesteps,
                            len(schedule.alphas_cumprod))
    inc = vp_increments(schedule.alphas_cumprod, ts)
    T = len(ts) - 1
    device = policy._device()
    x = policy.initial_noise(n, generator, device)
    stochastic, ode = solver in ("em", "heun"), solver.startswith("ode")
    c = 0.5 if ode else 1.0  # weight of the action in the drift: beta a (SDE) or beta a / 2 (ODE)
    states, scores, ref_scores, noises, kls, logps = [x], [], [], [], [], []
    d = x[0].numel()
    for k in range(T):
        b = float(inc[k])
        a = policy.score_at(x, ts[k], cond, which)
        scores.append(a)
        if with_kl:
            a_ref = a if which == "reference" else policy.score_at(x, ts[k], cond, "reference")
            a_pol = a if which == "policy" else policy.score_at(x, ts[k], cond, "policy")
            ref_scores.append(a_ref)
            kls.append(girsanov_step_kl(a_pol, a_ref, b))
        drift = 0.5 * b * x + c * b * a
        if stochastic:
            z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            noises.append(z)
            kick = math.sqrt(b) * z
        else:
            kick = 0.0
        x_next = x + drift + kick
        if solver in ("heun", "ode-heun") and (k < T - 1 or final_corrector):
            a_end = policy.score_at(x_next, ts[k + 1], cond, which)
            x_next = x + 0.5 * (drift + 0.5 * b * x_next + c * b * a_end) + kick
        if solver == "em":  # log N(x'; mean, B I) with x' - mean = sqrt(B) z
            logps.append(-0.5 * (z**2).flatten(1).sum(1) - 0.5 * d * math.log(2 * math.pi * b))
        x = x_next
        states.append(x)
    stack = lambda v: torch.stack(v, 1) if v else None  # noqa: E731
    return SDESample(torch.stack(states, 1), cond, ts, inc, solver, torch.stack(scores, 1), stack(ref_scores),
                     stack(noises), stack(kls), stack(logps))
