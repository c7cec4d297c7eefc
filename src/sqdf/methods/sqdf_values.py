"""The soft value V(x', t_{k+1}) that SQDF differentiates at the state x' a reparameterized step lands in.

SQDF's loss at a pair (stored state x before step k) is -[w_k V(x') - alpha KL_k], w_k = gamma^(T-1-k); the exact
soft Q of the step is V*(x') = alpha log E_ref[exp(r(x_0)/alpha) | x'] (``sqdf.diffusion.soft_value``). The
estimates of it, each ``value(policy, x_next, k_next, cond, reward, generator) -> (V [B], reward queries spent)``
(the generator: the iteration's, for any noise the estimate draws, so resume is exact):

* ``paper``: r(x0_hat(x')) with a training-free x0 estimator (Tweedie, ODE, consistency): the published SQDF.
  One reward query per pair. Biased wherever the posterior of x_0 is spread (mid noise, between modes); the
  discount gamma < 1 shrinks the bias in magnitude only.
* ``mc``: alpha log mean_j exp(r(x0_j)/alpha) over M reparameterized short stochastic reference chains from x'
  (``reference_chain_x0``). M queries per pair; tends to V* as M and the chain length grow.
* ``critic``: a learned V_phi(x', t) (``models.value.SoftCritic``) regressed on the soft returns
  r - alpha sum_{s >= k} KL_s of the replay buffer (the value of the sampling policies, V^pi; soft policy
  iteration makes it V* at the fixed point). No reward query beyond the rollouts: at the last step too V_phi has
  learned r. Also works with black-box rewards (no reward gradient is taken).
* ``exact``: the task's exact soft value (toy mixture tasks: ``MixtureTask.soft_value``), a diagnostic: the
  ceiling a perfect estimate gives. Charges no query.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.estimators import reference_chain_x0
from ..errors import ConfigError
from ..models.value import SoftCritic

VALUES = ("paper", "mc", "critic", "exact")


class SoftValue:
    """A soft-value estimate. The hooks below are what a learned one needs around the update; the training-free
    ones keep these no-op defaults."""

    warmup: int = 0  # first iterations that only prepare the value (no policy step)

    def state_estimates(self, policy, states: torch.Tensor, cond) -> torch.Tensor | None:
        """Per-state quantities to keep in the replay buffer beside new chains (x0 estimates), or None."""
        return None

    def update(self, policy, buffer, generator: torch.Generator) -> dict[str, float]:
        """Learn from the buffer once per iteration; returns metrics to log."""
        return {}

    def to(self, device) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PaperValue(SoftValue):
    """r(x0_hat(x')), one reward query per pair."""

    def __init__(self, estimator):
        self.estimator = estimator

    def __call__(self, policy, x_next, k_next, cond, reward, generator=None) -> tuple[torch.Tensor, int]:
        x0_hat = self.estimator(policy, x_next, k_next, cond)
        return reward(x0_hat, cond), x_next.shape[0]


class MonteCarloValue(SoftValue):
    """alpha log mean_j exp(r(x0_j)/alpha), x0_j from ``samples`` reference chains of ``steps`` steps each."""

    def __init__(self, alpha: float, samples: int, steps: int):
        self.alpha, self.samples, self.steps = alpha, samples, steps

    def __call__(self, policy, x_next, k_next, cond, reward, generator=None) -> tuple[torch.Tensor, int]:
        b, m = x_next.shape[0], self.samples
        final = k_next == policy.num_steps
        rep = x_next.repeat_interleave(m, 0)
        k_rep = k_next.repeat_interleave(m, 0)
        cond_rep = None if cond is None else cond.repeat_interleave(m, 0)
        if generator is None and self.steps > 1:
            raise ValueError("the mc value draws chain noise: pass the iteration's generator")
        noises = [torch.randn(rep.shape, generator=generator, device=generator.device).to(rep.device, rep.dtype)
                  for _ in range(self.steps - 1)]
        x0 = reference_chain_x0(policy, rep, k_rep, cond_rep, self.steps, noises)
        r = reward(x0, cond_rep).reshape(b, m)
        v = self.alpha * (torch.logsumexp(r / self.alpha, dim=1) - math.log(m))
        # at the last step the "chains" are x' itself: every draw is r(x'), and V = r(x') exactly
        return torch.where(final, r[:, 0], v), b * m


class ExactValue(SoftValue):
    """The task's exact soft value attached to the policy (``policy.soft_value``): no query (diagnostic)."""

    def __call__(self, policy, x_next, k_next, cond, reward, generator=None) -> tuple[torch.Tensor, int]:
        fn = policy.soft_value
        if fn is None:
            raise ConfigError("method.value=exact needs a task with a known soft value (the toy mixture tasks); "
                              "use method.value=critic")
        t = policy._timesteps.to(x_next.device)[k_next]
        return fn(x_next, t, cond).to(x_next.dtype), 0


class CriticValue(SoftValue):
    """V_phi(x', t_{k+1}) of a SoftCritic with its own Adam optimizer, refit on the buffer's soft returns: ``steps``
    steps of ``batch`` pairs per iteration (``update``), after ``warmup`` fit-only iterations."""

    def __init__(self, policy, estimator, alpha: float, hidden: int, layers: int, lr: float, x0_input: bool,
                 num_train_steps: int, steps: int = 8, batch: int = 512, warmup: int = 4, max_grad_norm: float = 10.0):
        self.estimator, self.alpha = estimator, alpha
        self.steps, self.batch, self.warmup, self.max_grad_norm = steps, batch, warmup, max_grad_norm
        self.net = SoftCritic(policy.sample_shape, hidden=hidden, num_layers=layers, x0_input=x0_input,
                              num_train_steps=num_train_steps).to(policy._device())
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    def _inputs(self, policy, x, k, cond, x0=None):
        t = policy._timesteps.to(x.device)[k]
        if self.net.x0_input and x0 is None:
            x0 = self.estimator(policy, x, k, cond)
        return x, t, cond, x0 if self.net.x0_input else None

    @torch.no_grad()
    def state_estimates(self, policy, states: torch.Tensor, cond, chunk: int = 1024) -> torch.Tensor | None:
        """x0 estimates [B, T+1, *shape] of every state of chains [B, T+1, *shape] (kept in the buffer, so the
        critic's fit costs no network call on them), or None when the critic reads no x0."""
        if not self.net.x0_input:
            return None
        b, n_states = states.shape[:2]
        flat = states.flatten(0, 1)
        k = torch.arange(n_states, device=states.device).repeat(b)
        c = None if cond is None else cond.repeat_interleave(n_states, 0)
        out = [self.estimator(policy, flat[s:s + chunk], k[s:s + chunk], None if c is None else c[s:s + chunk])
               for s in range(0, flat.shape[0], chunk)]
        return torch.cat(out).reshape(states.shape)

    def __call__(self, policy, x_next, k_next, cond, reward, generator=None) -> tuple[torch.Tensor, int]:
        return self.net(*self._inputs(policy, x_next, k_next, cond)), 0

    def update(self, policy, buffer, generator: torch.Generator) -> dict[str, float]:
        return {"critic_loss": self.fit(policy, buffer, self.steps, self.batch, generator, self.max_grad_norm)}

    def to(self, device) -> None:
        self.net.to(device)

    def fit(self, policy, buffer, steps: int, batch: int, generator: torch.Generator, max_grad_norm: float) -> float:
        """``steps`` Adam steps of the MSE to the soft returns on ``batch`` pairs (chain, k in 0..T) drawn
        uniformly; returns the last loss (in units of the return std)."""
        n, big_t = len(buffer), buffer.num_steps
        returns = buffer.returns(self.alpha)  # [N, T+1]
        self.net.set_scale_from(buffer.states[:n, -1])
        self.net.set_target_stats(float(returns.mean()), float(returns.std()))
        gdev = generator.device
        loss_value = float("nan")
        self.net.requires_grad_(True)
        for _ in range(steps):
            idx = torch.randint(0, n, (batch,), generator=generator, device=gdev).to(buffer.device)
            k = torch.randint(0, big_t + 1, (batch,), generator=generator, device=gdev).to(buffer.device)
            x = buffer.states[idx, k]
            cond = None if buffer.conds is None else buffer.conds[idx]
            with torch.no_grad():
                inputs = self._inputs(policy, x, k, cond, None if buffer.x0s is None else buffer.x0s[idx, k])
            pred = self.net(*inputs)
            loss = (((pred - returns[idx, k].to(pred.device)) / self.net.target_std) ** 2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _all_reduce_grads(self.net)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_grad_norm)
            self.optimizer.step()
            loss_value = float(loss.detach())
        self.net.requires_grad_(False)  # the policy's loss reads V_phi; its gradient must not reach phi
        return loss_value

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])


def _all_reduce_grads(module: torch.nn.Module) -> None:
    """Average gradients over processes (the critic is not wrapped in DDP), so every rank keeps the same critic."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
