"""SQDF: reparameterized policy gradient of a soft Q-function estimate.

Per iteration: sample B chains (no grad), score them, add them (with their step KLs) to a ring replay buffer; then
``replay_ratio`` times draw pairs (chain i, step k) from the buffer and minimize

    L = - mean_i [ gamma^(T-1-k_i) V(x'_i, t_{k_i+1}, c_i) - alpha * KL_k_i ],   x'_i = mu_theta(x_i) + sigma_k eps_i,

where x_i is the stored state before step k and KL_k the exact Gaussian KL of the policy step to the reference step
at x_i. V estimates the exact soft Q of the step, the soft value V*(x') = alpha log E_ref[exp(r(x_0)/alpha) | x']
(``method.value``, see ``sqdf_values``): the published SQDF uses r(x0_hat(x')) with a training-free x0 estimator
and a discount gamma < 1 (``value=paper``); the default learns V_phi on the buffer's soft returns
(``value=critic``, gamma = 1: soft policy iteration on the denoising MDP). Gradients reach theta through one policy
call per pair (through V and x'_i, and through KL_k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..diffusion.estimators import ESTIMATORS, make_estimator
from ..errors import ConfigError
from .base import IterationContext, Method, MethodConfig
from .replay_buffer import SAMPLING_MODES, ReplayBuffer
from .sqdf_values import VALUES, CriticValue, ExactValue, MonteCarloValue, PaperValue

KL_FORMS = ("exact", "official")


@dataclass
class SQDFConfig(MethodConfig):
    """Hyperparameters of SQDF. The defaults (a learned soft value, no discount) are one setting for every task;
    ``--method sqdf-paper`` (or method.value=paper with its gamma and sampling) is the published algorithm."""

    batch_size: int = option(32, "trajectories sampled (and scored) per iteration")
    value: str = option("critic", f"soft value V(x') the loss differentiates: one of {VALUES}. 'critic': learned on "
                        "the buffer's soft returns, no reward query beyond rollouts; 'paper': r(x0_hat(x')) with "
                        "`estimator`, 1 query per pair; 'mc': alpha log mean exp(r/alpha) over mc_samples reference "
                        "chains, mc_samples queries per pair; 'exact': the task's exact soft value (toy tasks; a "
                        "diagnostic ceiling, no query)")
    gamma: float = option(1.0, "discount over denoising steps, in (0, 1]; reward weight gamma^(T-1-k). 1 with a "
                          "soft value; the paper uses 0.9 (50 SD steps) with value=paper")
    alpha: float | None = option(None, "KL weight; None: the task's alpha (the objective's)")
    kl_form: str = option("exact", "'exact': ||dmu||^2/(2 sigma^2) summed; 'official': mean over dims of "
                          "||dmu||^2/sigma^2 (the official code's scaling)")
    estimator: str = option("tweedie", f"x0 estimator: one of {sorted(ESTIMATORS)}; value=paper scores r at its "
                            "estimate, value=critic reads it as an input. 'consistency' uses the task's distilled "
                            "consistency model (digits ships one)")
    estimator_steps: int = option(10, "DDIM steps of the 'ode' estimator (probability-flow solve to t = 0)")
    buffer_size: int = option(1024, "replay buffer capacity (trajectories); must be >= batch_size")
    replay_ratio: int = option(4, "policy gradient steps per iteration")
    train_batch_size: int | None = option(256, "(chain, step) pairs per policy gradient step; None: batch_size")
    sampling: str = option("random", f"buffer sampling rule: one of {SAMPLING_MODES} (reward_gamma_per weights "
                           "pairs by max(r, 0), so it never draws chains with negative rewards)")
    critic_hidden: int = option(256, "value=critic: hidden width of the critic")
    critic_layers: int = option(3, "value=critic: hidden layers of the critic")
    critic_lr: float = option(1e-3, "value=critic: Adam learning rate of the critic")
    critic_steps: int = option(8, "value=critic: critic gradient steps per iteration")
    critic_batch_size: int = option(512, "value=critic: (chain, step) pairs per critic step (steps 0..T)")
    critic_warmup: int = option(4, "value=critic: first iterations that fit the critic only (no policy step)")
    critic_x0_input: bool = option(True, "value=critic: feed the estimator's x0 estimate of the state to the critic")
    critic_max_grad_norm: float = option(10.0, "value=critic: gradient-norm clip of the critic; <= 0 disables")
    mc_samples: int = option(4, "value=mc: reference chains per pair (= reward queries per pair)")
    mc_steps: int = option(5, "value=mc: steps of each reference chain (1: Tweedie's mean)")

    def validate(self) -> None:
        super().validate()
        if self.value not in VALUES:
            raise ConfigError(f"method.value={self.value!r} must be one of {VALUES}")
        if not (0 < self.gamma <= 1):
            raise ConfigError(f"method.gamma={self.gamma} must be in (0, 1]; 1 means no discount")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"method.alpha={self.alpha} must be > 0 (or None to use the task's alpha)")
        if self.kl_form not in KL_FORMS:
            raise ConfigError(f"method.kl_form={self.kl_form!r} must be one of {KL_FORMS}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"method.estimator={self.estimator!r} must be one of {sorted(ESTIMATORS)}")
        if self.buffer_size < self.batch_size:
            raise ConfigError(
                f"method.buffer_size={self.buffer_size} is smaller than method.batch_size={self.batch_size}; "
                "raise buffer_size to at least the batch size"
            )
        if self.replay_ratio < 1:
            raise ConfigError(f"method.replay_ratio={self.replay_ratio} must be >= 1")
        if self.train_batch_size is not None and self.train_batch_size < 1:
            raise ConfigError(f"method.train_batch_size={self.train_batch_size} must be >= 1")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError(f"method.sampling={self.sampling!r} must be one of {SAMPLING_MODES}")
        for name in ("critic_hidden", "critic_layers", "critic_steps", "critic_batch_size", "mc_samples", "mc_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method.{name}={getattr(self, name)} must be >= 1")
        if not self.critic_lr > 0:
            raise ConfigError(f"method.critic_lr={self.critic_lr} must be > 0")
        if self.critic_warmup < 0:
            raise ConfigError(f"method.critic_warmup={self.critic_warmup} must be >= 0")


@dataclass
class SQDFPaperConfig(SQDFConfig):
    """The published SQDF: the training-free value r(x0_hat(x')) (Tweedie or consistency), a discount, reward-
    prioritized replay, one gradient step of B pairs per iteration (the official code's settings)."""

    batch_size: int = option(64, "trajectories sampled (and scored) per iteration")
    value: str = option("paper", f"soft value V(x'): one of {VALUES} (see `--method sqdf`)")
    gamma: float = option(0.9, "discount over denoising steps, in (0, 1]; reward weight gamma^(T-1-k)")
    replay_ratio: int = option(1, "gradient steps per iteration")
    train_batch_size: int | None = option(None, "(chain, step) pairs per gradient step; None: batch_size")
    sampling: str = option("reward_gamma_per", f"buffer sampling rule: one of {SAMPLING_MODES}")


def sqdf_loss(
    rewards: torch.Tensor, kls: torch.Tensor, steps_to_go: torch.Tensor, gamma: float, alpha: float
) -> torch.Tensor:
    """L = -mean(gamma^n * r - alpha * KL) for rewards, kls, steps_to_go (n = T-1-k) all [B]."""
    discount = torch.as_tensor(gamma, dtype=rewards.dtype, device=rewards.device) ** steps_to_go.to(rewards.dtype)
    return -(discount * rewards - alpha * kls).mean()


class SQDF(Method):
    name = "sqdf"
    config_class = SQDFConfig
    needs_reward_gradient = True

    @classmethod
    def reward_gradient_needed(cls, config: SQDFConfig) -> bool:
        return config.value in ("paper", "mc")

    def __init__(self, config: SQDFConfig, policy, alpha: float):
        super().__init__(config, policy, alpha if config.alpha is None else config.alpha)
        kwargs = {"num_steps": config.estimator_steps} if config.estimator == "ode" else {}
        self.estimator = make_estimator(config.estimator, **kwargs)
        self.buffer = ReplayBuffer(config.buffer_size, policy.num_steps, device=policy._device())
        self.iterations = 0
        if config.value == "paper":
            self.value = PaperValue(self.estimator)
        elif config.value == "mc":
            self.value = MonteCarloValue(self.alpha, config.mc_samples, config.mc_steps)
        elif config.value == "exact":
            self.value = ExactValue()
        else:
            num_train = len(getattr(policy.schedule, "alphas_cumprod", ())) or 1000
            self.value = CriticValue(policy, self.estimator, self.alpha, config.critic_hidden, config.critic_layers,
                                     config.critic_lr, config.critic_x0_input, num_train, config.critic_steps,
                                     config.critic_batch_size, config.critic_warmup, config.critic_max_grad_norm)

    def to(self, device) -> "SQDF":
        self.value.to(device)
        return self

    def step_kl(self, mean: torch.Tensor, ref_mean: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Per-pair KL [B] in the configured form."""
        if self.config.kl_form == "exact":
            return self.policy.step_kl(mean, ref_mean, k)
        sigma = self.policy.sigma_of(mean, k)
        return (((mean - ref_mean) / sigma) ** 2).flatten(1).mean(1)

    def pair_loss(self, x: torch.Tensor, k: torch.Tensor, cond, noise: torch.Tensor, reward,
                  generator: torch.Generator | None = None) -> tuple:
        """Loss over pairs (state x [B, *shape] before step k [B]); returns (loss, values, kls). ``generator``: for
        values that draw noise (mc)."""
        x_next, mean, ref_mean = self.policy.reparameterized_step(x, k, cond, noise)
        v, _ = self.value(self.policy, x_next, k + 1, cond, reward, generator)
        kl = self.step_kl(mean, ref_mean, k)
        steps_to_go = self.policy.num_steps - 1 - k
        return sqdf_loss(v, kl, steps_to_go, self.config.gamma, self.alpha), v, kl

    def reset_buffer(self) -> None:
        """Empty the replay buffer (the black-box loop does it each round: old chains were scored by an old proxy)."""
        self.buffer.clear()

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        roll = ctx.rollout(cfg.batch_size)
        traj = roll.trajectory
        x0s = self.value.state_estimates(self.policy, traj.states, traj.cond)
        self.buffer.add(traj.states, roll.rewards, traj.cond, traj.kls, x0s)
        out: dict[str, float] = {"buffer_size": len(self.buffer), **self.value.update(self.policy, self.buffer,
                                                                                     ctx.generator)}
        self.iterations += 1
        if self.iterations <= self.value.warmup:
            return out
        n_pairs = cfg.train_batch_size or cfg.batch_size
        losses, kls, grad_norms = [], [], []
        for _ in range(cfg.replay_ratio):
            idx, k = self.buffer.sample_pairs(n_pairs, cfg.sampling, ctx.generator, cfg.gamma)
            x = self.buffer.states[idx, k]
            cond = None if self.buffer.conds is None else self.buffer.conds[idx]
            noise = torch.randn(x.shape, generator=ctx.generator, device=ctx.generator.device).to(x.device)
            loss, _, kl = self.pair_loss(x, k, cond, noise, ctx.reward, ctx.generator)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            kls.append(float(kl.detach().mean()))
            grad_norms.append(stats.get("grad_norm", float("nan")))
        n = len(losses)
        out.update({"loss": sum(losses) / n, "step_kl": sum(kls) / n, "grad_norm": sum(grad_norms) / n})
        return out

    def state_dict(self) -> dict:
        state = {"buffer": self.buffer.state_dict(), "iterations": self.iterations}
        value_state = self.value.state_dict()
        if value_state:
            state["critic"] = value_state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.iterations = int(state.get("iterations", 0))
        self.value.load_state_dict(state.get("critic", {}))


class SQDFPaper(SQDF):
    """The published SQDF (training-free value, discount, prioritized replay): ``--method sqdf-paper``."""

    name = "sqdf-paper"
    config_class = SQDFPaperConfig
