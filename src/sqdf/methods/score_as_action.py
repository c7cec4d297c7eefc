"""Score as Action: continuous-time policy gradient with the score of the reverse SDE as the action.

The problem (docs/score_as_action.md has the full derivation). The reverse VP SDE of ``sqdf.diffusion.sde``,
dx = [1/2 beta x + beta a] ds + sqrt(beta) dW (s = -t, t from N-1 down to 0), is a controlled process whose
action is the score a_theta(t, x) = -eps_theta / sqrt(1 - abar_t). The objective is

    max_theta  E[r(X_0)] - alpha KL(P_theta || P_ref),   KL(P_theta || P_ref) = E int 1/2 beta ||a_theta - a_ref||^2 dt

(Girsanov: the path KL is a running cost). Discretized by Euler-Maruyama on a grid t_0 > ... > t_T with
B_k = integral of beta over step k, the step is x_{k+1} = x_k + 1/2 B_k x_k + B_k a + sqrt(B_k) z_k, i.e. a
Gaussian policy over actions a ~ N(a_theta(t_k, x_k), I / B_k) (Gaussian exploration around the score), and the
per-step KL is exactly kl_k = 1/2 B_k ||a_theta - a_ref||^2 at x_k, so the path KL is sum_k kl_k exactly.

Soft value and advantages. V(t_k, x) = E[r(X_T) - alpha sum_{j >= k} kl_j | x_k = x] satisfies
V(t_k, x_k) = E[V(t_{k+1}, x_{k+1}) | x_k] - alpha kl_k and V(t_T, x) = r(x) exactly (terminal boundary). The TD
advantage A_k = V(t_{k+1}, x_{k+1}) - V(t_k, x_k) - alpha kl_k has mean zero given x_k; GAE(lambda) sums
A_k = sum_{j >= k} lambda^{j-k} delta_j (lambda = 1: the Monte-Carlo soft return minus V).

Policy gradient. grad J = E sum_k [grad log pi_k * A_k] - alpha E sum_k grad_theta kl_k(x_k), where
grad log pi_k = sqrt(B_k) z_k . grad a_theta (the EM step's density in the action) and the second term is the
explicit derivative of the running cost at the visited states. Both are sums of O(B_k) terms, so the estimator
converges as the grid is refined (A_k has a sqrt(B_k)-size martingale part that pairs with sqrt(B_k) z_k): the
loss is a *sum over steps* and a mean over chains, and its meaning does not depend on the step count or on the
grid, which may be drawn at random every iteration (``time_grid="random"``).

Trust region. The per-step ratio pi_theta / pi_old = exp(sqrt(B_k) z . d - 1/2 B_k ||d||^2), d = a_theta - a_old,
tends to 1 as B_k -> 0, so clipping it (PPO) means something different at every step size. Instead the
continuous-time KL between the new and the old (sampling) policy along the sampled paths,
KL_old = mean_b sum_k 1/2 B_k ||a_theta - a_old||^2 (Girsanov), is penalized with an adaptive coefficient
(PPO-KL: doubled when the KL after an iteration exceeds 1.5 x ``kl_target``, halved below kl_target / 1.5), and the
inner epochs stop early once KL_old exceeds ``kl_stop_factor`` x kl_target. Per minibatch the loss is

    L = mean_b sum_k [ -ratio_k A_k + alpha kl_k(theta) + kl_coef 1/2 B_k ||a_theta - a_old||^2 ].

Value network (``value_design``). "tweedie": V_phi(t, x) = r(m_ref(t, x)) + sigma_t h_phi(t, x), with m_ref the
frozen reference's Tweedie estimate of the terminal state x_{t_T} (``sde.terminal_tweedie``; no gradient through
the reward), sigma_t = sqrt(1 - abar_t / abar_{t_T}) and h_phi a small MLP, so V(t_T, x) = r(x) exactly. Its
reward evaluations count as queries: B x T extra queries per iteration (one per visited state). "mlp":
V = h_phi(t, x) before the last state and r(x) at it, with no extra queries. h_phi is fitted each iteration (after
the advantages are computed with the previous fit) by regression of V on the Monte-Carlo soft returns
G_k = r(x_T) - alpha sum_{j >= k} kl_j, in its own parameter group with its own learning rate.

Sampling. This method samples itself (Euler-Maruyama with the current policy, no gradients) rather than through
``ctx.rollout`` (the discrete DDPM sampler): conditions from ``ctx.conditions``, rewards from ``ctx.reward``, all
randomness (grids, noise, minibatches) from ``ctx.generator`` so that resume is exact. Evaluation samples with
``eval_solver`` on the policy's own grid and reports the Girsanov sum as the path KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import option
from ..diffusion.schedule import spaced_timesteps
from ..diffusion.sde import (
    SOLVERS,
    check_vp,
    em_log_ratio,
    random_timesteps,
    sample_sde,
    terminal_tweedie,
    vp_increments,
)
from ..errors import ConfigError
from ..models.value import ValueMLP
from .base import Generated, IterationContext, MethodConfig, ValueHeadMethod
from .common import repeat_cond

TIME_GRIDS = ("fixed", "random")
MAX_INCREMENT = 4.0  # largest integral of beta over one EM step that the method accepts (EM is unstable beyond)
VALUE_DESIGNS = ("tweedie", "mlp")


@dataclass
class ScoreAsActionConfig(MethodConfig):
    """Hyperparameters of Score as Action (no public code; defaults tuned on the toy tasks, see the docs)."""

    lr: float = option(1e-3, "AdamW learning rate of the policy")
    alpha: float | None = option(None, "KL weight of the objective; None: the task's alpha")
    num_steps: int = option(0, "Euler-Maruyama steps T of the training sampler; 0: the policy's schedule step count")
    time_grid: str = option("fixed", "'fixed': evenly spaced timesteps; 'random': a jittered integer grid from "
                            "N-1 to 0 drawn each iteration (the objective does not depend on the grid)")
    num_inner_epochs: int = option(4, "passes of policy-gradient steps over each sampled batch")
    num_minibatches: int = option(1, "gradient steps per pass (the chains are split into this many groups)")
    gae_lambda: float = option(0.9, "GAE lambda in [0, 1] of the TD advantages (0: one-step TD, 1: Monte Carlo)")
    kl_target: float = option(0.02, "trust region: target KL (nats per chain) between the new and the sampling "
                              "policy's SDE path measures after an iteration")
    kl_coef_init: float = option(1.0, "initial coefficient of the KL_old penalty (adapted: x2 / x0.5)")
    kl_stop_factor: float = option(4.0, "stop the inner epochs once KL_old > kl_stop_factor * kl_target; 0: never")
    value_design: str = option("tweedie", "'tweedie': V = r(reference Tweedie estimate) + sigma_t h(t, x) (B x T "
                               "extra reward queries per iteration); 'mlp': V = h(t, x), no extra queries")
    value_lr: float = option(1e-3, "learning rate of the value MLP h")
    value_epochs: int = option(2, "passes of value regression over each batch's (chain, step) states")
    value_batch_size: int = option(512, "states per value regression step")
    value_hidden: int = option(128, "width of the value MLP h")
    eval_solver: str = option("em", f"solver of the evaluation sampler on the policy's grid, one of {SOLVERS}")

    def validate(self) -> None:
        super().validate()
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"method.alpha={self.alpha} must be > 0 (or None for the task's alpha)")
        if self.num_steps < 0:
            raise ConfigError(f"method.num_steps={self.num_steps} must be >= 0 (0: the policy's step count)")
        if self.time_grid not in TIME_GRIDS:
            raise ConfigError(f"method.time_grid={self.time_grid!r} must be one of {TIME_GRIDS}")
        if self.num_inner_epochs < 1:
            raise ConfigError(f"method.num_inner_epochs={self.num_inner_epochs} must be >= 1")
        if not 1 <= self.num_minibatches <= self.batch_size:
            raise ConfigError(f"method.num_minibatches={self.num_minibatches} must be in [1, method.batch_size]")
        if not 0.0 <= self.gae_lambda <= 1.0:
            raise ConfigError(f"method.gae_lambda={self.gae_lambda} must be in [0, 1]")
        if not self.kl_target > 0:
            raise ConfigError(f"method.kl_target={self.kl_target} must be > 0 (nats per chain, e.g. 0.02)")
        if not self.kl_coef_init > 0:
            raise ConfigError(f"method.kl_coef_init={self.kl_coef_init} must be > 0 (it is adapted by factors of 2)")
        if self.kl_stop_factor < 0:
            raise ConfigError(f"method.kl_stop_factor={self.kl_stop_factor} must be >= 0 (0: no early stop)")
        if self.value_design not in VALUE_DESIGNS:
            raise ConfigError(f"method.value_design={self.value_design!r} must be one of {VALUE_DESIGNS}")
        if not self.value_lr > 0:
            raise ConfigError(f"method.value_lr={self.value_lr} must be > 0")
        for name in ("value_epochs", "value_batch_size", "value_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method.{name}={getattr(self, name)} must be >= 1")
        if self.eval_solver not in SOLVERS:
            raise ConfigError(f"method.eval_solver={self.eval_solver!r} must be one of {SOLVERS}")


# ---- pure pieces -----------------------------------------------------------------------------------------------
def soft_returns(rewards: torch.Tensor, kls: torch.Tensor, alpha: float) -> torch.Tensor:
    """G_k = r - alpha sum_{j >= k} kl_j, [B, T]. rewards [B]; kls [B, T] (nats)."""
    to_go = kls.flip(1).cumsum(1).flip(1)
    return rewards[:, None] - alpha * to_go


def td_advantages(values: torch.Tensor, kls: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """GAE(lambda) of delta_k = V_{k+1} - V_k - alpha kl_k, [B, T]. values [B, T+1] (values[:, T] = r); kls [B, T].
    lambda = 0: A_k = delta_k; lambda = 1: A_k = G_k - V_k."""
    delta = values[:, 1:] - values[:, :-1] - alpha * kls
    adv = torch.empty_like(delta)
    acc = torch.zeros_like(delta[:, 0])
    for k in range(delta.shape[1] - 1, -1, -1):
        acc = delta[:, k] + lam * acc
        adv[:, k] = acc
    return adv


def score_as_action_loss(
    scores: torch.Tensor, old_scores: torch.Tensor, ref_scores: torch.Tensor, noises: torch.Tensor,
    increments: torch.Tensor, advantages: torch.Tensor, alpha: float, kl_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = mean_b sum_k [-ratio_k A_k + alpha kl_ref_k + kl_coef kl_old_k] over b chains of T EM steps.

    scores [b, T, *shape] (the policy's a_theta at the stored states, with grad); old_scores (the sampling
    policy's), ref_scores (the reference's), noises z_k: same shape; increments B_k [T]; advantages [b, T].
    kl_ref_k = 1/2 B_k ||a_theta - a_ref||^2, kl_old_k = 1/2 B_k ||a_theta - a_old||^2 (nats).
    Returns (loss, parts): parts are detached per-chain means of 'policy', 'kl_ref', 'kl_old', 'log_ratio_abs'.
    """
    b = increments.to(scores.device, scores.dtype)
    log_ratio = em_log_ratio(noises, scores, old_scores, increments)  # [b, T]
    kl_ref = 0.5 * b * ((scores - ref_scores) ** 2).flatten(2).sum(-1)
    kl_old = 0.5 * b * ((scores - old_scores) ** 2).flatten(2).sum(-1)
    policy = -(torch.exp(log_ratio) * advantages).sum(1).mean()
    kl_ref_path, kl_old_path = kl_ref.sum(1).mean(), kl_old.sum(1).mean()
    loss = policy + alpha * kl_ref_path + kl_coef * kl_old_path
    parts = {"policy": policy.detach(), "kl_ref": kl_ref_path.detach(), "kl_old": kl_old_path.detach(),
             "log_ratio_abs": log_ratio.detach().abs().mean()}
    return loss, parts


KL_COEF_RANGE = (1e-4, 1e4)  # the adaptive coefficient stays within this range (it can recover in a few doublings)


def adapt_kl_coef(coef: float, kl_old: float, target: float) -> float:
    """PPO-KL rule: x2 when kl_old > 1.5 target, x0.5 when kl_old < target / 1.5, else unchanged; kept in
    KL_COEF_RANGE."""
    if kl_old > 1.5 * target:
        coef *= 2.0
    elif kl_old < target / 1.5:
        coef /= 2.0
    return min(max(coef, KL_COEF_RANGE[0]), KL_COEF_RANGE[1])


# ---- the method ------------------------------------------------------------------------------------------------
class ScoreAsAction(ValueHeadMethod):
    name = "score-as-action"
    config_class = ScoreAsActionConfig

    def __init__(self, config: ScoreAsActionConfig, policy, alpha: float):
        super().__init__(config, policy, alpha if config.alpha is None else config.alpha)
        schedule = check_vp(policy)
        self.num_train_steps = len(schedule.alphas_cumprod)
        if config.num_steps >= self.num_train_steps:
            raise ConfigError(f"method.num_steps={config.num_steps} must be smaller than the schedule's "
                              f"{self.num_train_steps} training timesteps")
        steps = config.num_steps or policy.num_steps
        for what, grid in (("training", spaced_timesteps(self.num_train_steps, steps)),
                           ("evaluation", list(schedule.timesteps))):
            largest = float(vp_increments(schedule.alphas_cumprod, grid).max())
            if largest > MAX_INCREMENT:
                raise ConfigError(
                    f"the {what} grid ({len(grid) - 1} steps) has an Euler-Maruyama step that integrates beta over "
                    f"B = {largest:.3g} > {MAX_INCREMENT}, where the EM step is unstable; use more steps "
                    "(method.num_steps, task.num_inference_steps). A schedule whose final betas are clipped near 1 "
                    "(cosine, as the digits task) has such a step from t = N-1 at any step count: this method "
                    "does not support it (docs/score_as_action.md, Limits)")
        numel = math.prod(policy.sample_shape)
        cond_dim = getattr(policy.model, "cond_dim", 0)
        self.value = ValueMLP(numel, config.value_hidden, num_train_steps=self.num_train_steps, cond_dim=cond_dim)
        with torch.no_grad():  # h starts at 0: the "tweedie" value starts as the reference's Tweedie reward
            self.value.net[-1].weight.zero_()
            self.value.net[-1].bias.zero_()
        self.value.to(policy._device())
        self.kl_coef = float(config.kl_coef_init)

    # ---- grids and values ------------------------------------------------------------------------------------
    def time_grid(self, generator: torch.Generator) -> list[int]:
        """This iteration's training grid (T + 1 descending integer timesteps)."""
        cfg = self.config
        if cfg.time_grid == "random":
            return random_timesteps(self.num_train_steps, cfg.num_steps or self.policy.num_steps, generator)
        if cfg.num_steps == 0:
            return list(self.policy.schedule.timesteps)
        return spaced_timesteps(self.num_train_steps, cfg.num_steps)

    def _sigmas(self, ts: list[int], device) -> torch.Tensor:
        """sigma_t = sqrt(1 - abar_t / abar_{t_T}) at the grid's states t_0 .. t_{T-1}, [T] float32."""
        abar = self.policy.schedule.alphas_cumprod[torch.tensor(ts)]
        return (1 - abar[:-1] / abar[-1]).clamp(min=0).sqrt().to(device, torch.float32)

    def tweedie_rewards(self, states: torch.Tensor, ref_scores: torch.Tensor, ts: list[int], cond, reward):
        """r(m_ref(t_k, x_k)) at every visited state before the last, [B, T] (B x T counted reward queries)."""
        abar = self.policy.schedule.alphas_cumprod
        out = []
        for k in range(len(ts) - 1):
            x = states[:, k]
            m = terminal_tweedie(x, ref_scores[:, k], abar[ts[k]].expand(x.shape[0]), float(abar[ts[-1]]))
            out.append(reward(m, cond).detach().to(torch.float32))
        return torch.stack(out, 1)

    def state_values(self, x: torch.Tensor, t: torch.Tensor, cond, base: torch.Tensor | None,
                     sigma: torch.Tensor) -> torch.Tensor:
        """V_phi at states x [n, *shape] before the last, timesteps t [n]: base + sigma h ('tweedie', base =
        Tweedie rewards [n]) or h ('mlp', base None), [n]."""
        h = self.value(x, t, cond)
        return h if base is None else base + sigma * h

    @torch.no_grad()
    def value_at(self, x: torch.Tensor, t: int, cond, reward, t_end: int = 0) -> torch.Tensor:
        """V_phi(t, x) for states x [n, *shape] at one timestep t >= t_end, [n]: r(x) at t = t_end (the terminal
        boundary), else the configured design (the 'tweedie' design spends n reward queries)."""
        if t == t_end:
            return reward(x, cond).to(torch.float32)
        abar = self.policy.schedule.alphas_cumprod
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        sigma = self._sigmas([t, t_end], x.device).expand(x.shape[0])
        base = None
        if self.config.value_design == "tweedie":
            score = self.policy.score_at(x, tt, cond, "reference")
            m = terminal_tweedie(x, score, abar[t].expand(x.shape[0]), float(abar[t_end]))
            base = reward(m, cond).to(torch.float32)
        return self.state_values(x, tt, cond, base, sigma)

    # ---- one iteration ---------------------------------------------------------------------------------------
    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        B = cfg.batch_size
        ts = self.time_grid(ctx.generator)
        T = len(ts) - 1
        cond = ctx.conditions(B)
        self.policy.eval()
        path = sample_sde(self.policy, B, cond, ctx.generator, ts, "em", with_kl=True)
        device = path.states.device
        with torch.no_grad():
            rewards = ctx.reward(path.samples, cond).detach().to(torch.float32)
        kls = path.step_kls.to(torch.float32)
        # every state before the last, flattened chain-major: x, t, cond, sigma_t and (tweedie) r(m_ref)
        states = {"x": path.states[:, :-1].reshape(B * T, *path.states.shape[2:]),
                  "t": torch.tensor(ts[:-1], device=device).repeat(B),
                  "cond": repeat_cond(cond, torch.arange(B, device=device), T),
                  "sigma": self._sigmas(ts, device).repeat(B), "base": None}
        if cfg.value_design == "tweedie":
            states["base"] = self.tweedie_rewards(path.states, path.ref_scores, ts, cond, ctx.reward).reshape(B * T)
        with torch.no_grad():
            v = self.state_values(states["x"], states["t"], states["cond"], states["base"], states["sigma"])
        values = torch.cat([v.reshape(B, T), rewards[:, None]], 1)
        adv = td_advantages(values, kls, self.alpha, cfg.gae_lambda)

        losses, grad_norms, kl_old = self._update_policy(path, adv, ctx)
        self.kl_coef = adapt_kl_coef(self.kl_coef, kl_old, cfg.kl_target)
        value_loss = self._fit_value(states, soft_returns(rewards, kls, self.alpha).reshape(B * T), ctx)
        path_kl = float(path.path_kl.mean())
        n = max(len(losses), 1)
        return {
            "reward": float(rewards.mean()), "path_kl": path_kl,
            "objective": float(rewards.mean()) - self.alpha * path_kl,
            "policy_loss": sum(losses) / n, "grad_norm": sum(grad_norms) / n if grad_norms else float("nan"),
            "policy_steps": len(losses), "kl_old": kl_old, "kl_coef": self.kl_coef, "value_loss": value_loss,
            "advantage_std": float(adv.std()),
        }

    def _update_policy(self, path, adv: torch.Tensor, ctx: IterationContext) -> tuple[list, list, float]:
        """Inner epochs of minibatch steps on the loss (early stop on KL_old); returns (policy losses, grad norms,
        KL_old of the updated policy)."""
        cfg = self.config
        B, device = path.states.shape[0], path.states.device
        self.policy.train()
        losses, grad_norms, stop = [], [], False
        for _ in range(cfg.num_inner_epochs):
            perm = torch.randperm(B, generator=ctx.generator, device=ctx.generator.device).to(device)
            for chains in perm.chunk(cfg.num_minibatches):
                loss, parts = self._minibatch_loss(path, chains, adv[chains])
                stop = cfg.kl_stop_factor > 0 and float(parts["kl_old"]) > cfg.kl_stop_factor * cfg.kl_target
                if stop:  # this minibatch's KL_old (before its step) left the trust region: no more steps
                    break
                stats = ctx.optimizer_step(loss)
                losses.append(float(parts["policy"]))
                grad_norms.append(stats["grad_norm"])
            if stop:
                break
        return losses, grad_norms, self._kl_to_sampler(path, max(B // cfg.num_minibatches, 1))

    def _fit_value(self, states: dict, returns: torch.Tensor, ctx: IterationContext) -> float:
        """value_epochs passes of MSE regression of V_phi on the soft returns [n] at the flattened states; returns
        the mean loss."""
        cfg = self.config
        n, device = returns.shape[0], returns.device
        pick = lambda v, idx: None if v is None else v[idx]  # noqa: E731
        losses = []
        for _ in range(cfg.value_epochs):
            perm = torch.randperm(n, generator=ctx.generator, device=ctx.generator.device).to(device)
            for idx in perm.split(cfg.value_batch_size):
                pred = self.state_values(states["x"][idx], states["t"][idx], pick(states["cond"], idx),
                                         pick(states["base"], idx), states["sigma"][idx])
                loss = ((pred - returns[idx]) ** 2).mean()
                ctx.optimizer_step(loss)
                losses.append(float(loss.detach()))
        return sum(losses) / len(losses)

    def _policy_scores(self, path, chains: torch.Tensor) -> torch.Tensor:
        """a_theta(t_k, x_k) at the chosen chains' stored states, [b, T, *shape] (with grad)."""
        ts = path.timesteps
        b, T = chains.shape[0], len(ts) - 1
        shape = path.states.shape[2:]
        x = path.states[chains, :-1].reshape(b * T, *shape)
        t = torch.tensor(ts[:-1], device=x.device).repeat(b)
        cond = repeat_cond(path.cond, chains, T)
        return self.policy.score_at(x, t, cond).reshape(b, T, *shape)

    def _minibatch_loss(self, path, chains: torch.Tensor, adv: torch.Tensor):
        scores = self._policy_scores(path, chains)
        return score_as_action_loss(scores, path.scores[chains], path.ref_scores[chains], path.noises[chains],
                                    path.increments, adv, self.alpha, self.kl_coef)

    @torch.no_grad()
    def _kl_to_sampler(self, path, chunk: int) -> float:
        """KL_old of the updated policy: mean over chains of sum_k 1/2 B_k ||a_theta - a_old||^2 (Girsanov)."""
        total, B = 0.0, path.states.shape[0]
        b = path.increments.to(path.states.device, torch.float32)
        for chains in torch.arange(B, device=path.states.device).split(chunk):
            scores = self._policy_scores(path, chains)
            sq = ((scores - path.scores[chains]) ** 2).flatten(2).sum(-1)
            total += float((0.5 * b * sq).sum())
        return total / B

    # ---- evaluation and state --------------------------------------------------------------------------------
    def generate(self, n: int, cond, generator: torch.Generator, reward) -> Generated:
        solver = self.config.eval_solver
        path = sample_sde(self.policy, n, cond, generator, None, solver, with_kl=True)
        note = ("Girsanov sum along the EM path" if solver == "em" else
                f"Girsanov sum along the {solver} path (a Riemann estimate of the SDE path KL, not an exact KL)")
        return Generated(path.samples, path.path_kl, note)

    def state_dict(self) -> dict:
        return {"value": self.value.state_dict(), "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.value.load_state_dict(state["value"])
        self.kl_coef = float(state["kl_coef"])
