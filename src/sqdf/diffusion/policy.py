"""A diffusion policy: a trainable denoiser, its frozen reference, and a schedule.

Step ``k`` of the sampler (k = 0 .. T-1) maps ``x_{t_k}`` to ``x_{t_{k+1}}`` with the Gaussian
``N(mean_k(x), sigma_k^2 I)``; policy and reference share ``sigma_k`` and differ in the mean. States are
[B, *sample_shape]. Everything that later wraps diffusers models implements the same methods.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .schedule import NoiseSchedule, accumulation_dtype, gaussian_kl, gaussian_log_prob, prediction_to_eps_and_x0


@dataclass
class Trajectory:
    """B sampled chains. states [B, T+1, *shape] (states[:, -1] is the sample x_0); cond [B, ...] or None;
    log_probs, ref_log_probs, kls [B, T] per step (kls: exact KL(policy step || reference step) at the state)."""

    states: torch.Tensor
    cond: torch.Tensor | None
    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    kls: torch.Tensor

    @property
    def samples(self) -> torch.Tensor:
        return self.states[:, -1]

    @property
    def batch_size(self) -> int:
        return self.states.shape[0]

    @property
    def path_kl(self) -> torch.Tensor:
        """Sum of per-step exact KLs along each chain, [B]."""
        return self.kls.sum(1)


class DiffusionPolicy(nn.Module):
    """Trainable denoiser + frozen reference + schedule.

    Args:
        model: the trainable denoiser, ``model(x, t, cond) -> prediction``; a peft model is allowed.
        schedule: the noise schedule with its inference grid and eta (``NoiseSchedule`` or ``FlowMatchSchedule``).
        sample_shape: shape of one sample, e.g. (2,) or (1, 16, 16).
        reference: the frozen reference denoiser. None: a frozen deep copy of ``model``, or, for a peft model,
            the same model with its adapters disabled (no second copy in memory).
        prediction_type: overrides ``model.prediction_type`` ("epsilon", "v_prediction", "sample" or "flow").
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        sample_shape: tuple[int, ...],
        reference: nn.Module | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.prediction_type = prediction_type or getattr(model, "prediction_type", "epsilon")
        self._adapter_reference = reference is None and hasattr(model, "disable_adapter")
        if reference is None and not self._adapter_reference:
            reference = copy.deepcopy(model)
        if reference is not None:
            for p in reference.parameters():
                p.requires_grad_(False)
            reference.eval()
            # Held outside the module tree so that state_dict() and .parameters() contain the policy only.
            self.__dict__["reference"] = reference
        else:
            self.__dict__["reference"] = None
        self.__dict__["consistency_model"] = None
        self.__dict__["soft_value"] = None  # (x [B, *shape], t [B], cond) -> [B]: a task's exact soft value, if any
        self._abar = schedule.abar.to(torch.float64)  # cast to the state's dtype where used
        self._signal = schedule.signal.to(torch.float64)
        self._noise = schedule.noise.to(torch.float64)
        self._sigmas = schedule.sigmas.to(torch.float64)
        # eps coefficient of each step's mean, in float64: the schedule's own (e.g. the flow SDE step's), else DDIM's
        # sqrt(noise_{k+1}^2 - sigma_k^2)
        eps_coefs = getattr(schedule, "eps_coefs", None)
        self._eps_coef = ((self._noise[1:] ** 2 - self._sigmas**2).clamp(min=0).sqrt() if eps_coefs is None
                          else torch.as_tensor(eps_coefs, dtype=torch.float64))
        self._timesteps = torch.tensor(schedule.timesteps)  # long for VP grids, float for flow times

    # ---- networks -------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.reference is not None:
            self.reference._apply(fn, recurse)
        if self.consistency_model is not None:
            self.consistency_model._apply(fn, recurse)
        return out

    def attach_consistency_model(self, model: nn.Module) -> None:
        """Attach a frozen consistency model ``f(x, t, cond) -> x0`` of the reference sampler (used by the
        'consistency' x0 estimator); kept outside state_dict() and parameters(), moved with the policy."""
        for p in model.parameters():
            p.requires_grad_(False)
        self.__dict__["consistency_model"] = model.eval().to(self._device())

    def attach_soft_value(self, fn) -> None:
        """Attach a task's exact soft value ``fn(x [B, *shape], t [B] model timesteps, cond) -> [B]``
        (V*(x, t) = alpha log E_ref[exp(r(x_0)/alpha) | x_t = x]; SQDF's method.value=exact reads it)."""
        self.__dict__["soft_value"] = fn

    @contextmanager
    def _reference_mode(self):
        if self._adapter_reference:  # the policy network with its adapters off, called past any DDP wrapper
            inner = getattr(self.model, "module", self.model)
            with inner.disable_adapter():
                yield inner
        else:
            yield self.reference

    def _levels(self, x: torch.Tensor, k) -> torch.Tensor:
        """Grid index k (int or [B] long) as a [B] long tensor on x's device."""
        if isinstance(k, int):
            return torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        k = torch.as_tensor(k, device=x.device, dtype=torch.long)
        if k.shape != (x.shape[0],):
            raise ValueError(f"per-sample step indices must have shape [{x.shape[0]}], got {tuple(k.shape)}")
        return k

    def _bcast(self, values: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[k] reshaped to [B, 1, ..., 1] to broadcast against x."""
        return values.to(x.device, x.dtype)[k].view(-1, *([1] * (x.ndim - 1)))

    def _net(self, which: str, x: torch.Tensor, k: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self._net_at(which, x, self._timesteps.to(x.device)[k], cond)

    def _net_at(self, which: str, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The chosen network's raw prediction at model timesteps t [B]."""
        if which == "policy":
            return self.model(x, t, cond)
        if which == "reference":
            with self._reference_mode() as ref:
                return ref(x, t, cond)
        raise ValueError(f"which={which!r} must be 'policy' or 'reference'")

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def abar(self, k: int) -> float:
        """abar at grid index k (0 = start noise, T = final sample)."""
        return float(self._abar[k])

    def sigma(self, k: int) -> float:
        """Std of step k (from grid index k to k+1)."""
        return float(self._sigmas[k])

    def sigma_of(self, x: torch.Tensor, k) -> torch.Tensor:
        """Per-sample std of step k (int or [B]) shaped [B, 1, ..., 1] like x."""
        return self._bcast(self._sigmas, self._levels(x, k), x)

    def _exact_sigma(self, x: torch.Tensor, k) -> torch.Tensor:
        """Per-sample std of step k as [B] in the log-probs' accumulation dtype (float64: the rollout's and a
        re-scoring's log-probs then use the same, unrounded sigma)."""
        return self._sigmas.to(accumulation_dtype(x)).to(x.device)[self._levels(x, k).to(x.device)]

    def predict(
        self, x: torch.Tensor, k, cond: torch.Tensor | None = None, which: str = "policy"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) of the chosen network at grid index k (int or [B]; 0 .. T), each [B, *shape]."""
        kk = self._levels(x, k)
        pred = self._net(which, x, kk, cond)
        signal, noise = self._bcast(self._signal, kk, x), self._bcast(self._noise, kk, x)
        return self._eps_and_x0(pred, x, signal, noise, which)

    def predict_at(
        self, x: torch.Tensor, t, cond: torch.Tensor | None = None, which: str = "policy"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) of the chosen network at model timesteps t (int or [B]; for VP schedules integer
        training timesteps 0 .. N-1, off the inference grid too), each [B, *shape]."""
        tt = self._model_times(x, t)
        pred = self._net_at(which, x, tt, cond)
        signal, noise = self._coefficients_at(x, tt)
        return self._eps_and_x0(pred, x, signal, noise, which)

    def score_at(self, x: torch.Tensor, t, cond: torch.Tensor | None = None, which: str = "policy") -> torch.Tensor:
        """Score estimate grad_x log p_t(x) = -eps_hat / noise_t (noise_t = sqrt(1 - abar_t) for VP) of the chosen
        network at model timesteps t (int or [B]), [B, *shape]; units 1 / (units of x)."""
        eps, _ = self.predict_at(x, t, cond, which)
        return -eps / self._coefficients_at(x, self._model_times(x, t))[1]

    def _model_times(self, x: torch.Tensor, t) -> torch.Tensor:
        """Model timesteps t (a number or [B]) as a [B] tensor on x's device (long for VP schedules, checked)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"per-sample timesteps must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        if isinstance(self.schedule, NoiseSchedule):
            t = t.long()
            if int(t.min()) < 0 or int(t.max()) >= len(self.schedule.alphas_cumprod):
                raise IndexError(f"timesteps must lie in [0, {len(self.schedule.alphas_cumprod) - 1}]")
        return t

    def _coefficients_at(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal, noise) at model timesteps t [B], each [B, 1, ..., 1] in x's dtype."""
        signal, noise = self.schedule.coefficients_at(t)
        shape = (-1, *([1] * (x.ndim - 1)))
        return signal.to(x.device, x.dtype).view(shape), noise.to(x.device, x.dtype).view(shape)

    def _eps_and_x0(self, pred: torch.Tensor, x: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor,
                    which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) from a raw prediction at a state with coefficients (signal, noise) [B, 1, ...]."""
        if pred.shape != x.shape:
            raise ConfigError(
                f"the {which} denoiser returned shape {tuple(pred.shape)} for input {tuple(x.shape)}; "
                "it must return a prediction of the input's shape"
            )
        eps, x0 = prediction_to_eps_and_x0(pred, x, signal, noise, self.prediction_type)
        clip = self.schedule.clip_sample
        if clip is not None:  # clamp x0 to the data range; "ddpm": the eps that goes with it, "ddim": the network's
            x0 = x0.clamp(-clip, clip)
            if getattr(self.schedule, "clip_sample_mode", "ddpm") == "ddpm":
                eps = (x - signal * x0) / noise.clamp(min=1e-12)
        return eps, x0

    def step_mean(self, x: torch.Tensor, k, cond: torch.Tensor | None = None, which: str = "policy") -> torch.Tensor:
        """Mean of step k's Gaussian at state x (grid index k, int or [B]), [B, *shape]."""
        kk = self._levels(x, k)
        if int(kk.min()) < 0 or int(kk.max()) >= self.num_steps:
            raise IndexError(f"step indices must lie in [0, {self.num_steps - 1}]")
        eps, x0 = self.predict(x, kk, cond, which)
        return self._bcast(self._signal, kk + 1, x) * x0 + self._bcast(self._eps_coef, kk, x) * eps

    def step_distribution(
        self, x: torch.Tensor, k, cond: torch.Tensor | None = None, which: str = "policy"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B, *shape], std [B, 1, ...]) of step k for the policy or the reference."""
        return self.step_mean(x, k, cond, which), self.sigma_of(x, k)

    def reparameterized_step(
        self, x: torch.Tensor, k, cond: torch.Tensor | None, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Take step k (int or [B]) with fixed noise; gradients flow through the policy mean.

        Returns (x_next = mean + sigma_k * noise, policy mean, reference mean (no grad)).
        """
        mean = self.step_mean(x, k, cond, "policy")
        with torch.no_grad():
            ref_mean = self.step_mean(x, k, cond, "reference")
        return mean + self.sigma_of(x, k) * noise, mean, ref_mean

    def step_log_prob(
        self, x: torch.Tensor, x_next: torch.Tensor, k, cond: torch.Tensor | None = None, which: str = "policy"
    ) -> torch.Tensor:
        """log N(x_next; mean_k(x), sigma_k^2 I) of the chosen network, [B]; differentiable in its parameters."""
        return gaussian_log_prob(x_next, self.step_mean(x, k, cond, which), self._exact_sigma(x, k))

    def step_kl(self, mean: torch.Tensor, ref_mean: torch.Tensor, k) -> torch.Tensor:
        """Exact KL(policy step || reference step) = ||mean - ref_mean||^2 / (2 sigma_k^2), [B]."""
        s = self._exact_sigma(mean, k)
        if bool((s <= 0).any()):
            raise ConfigError("the step KL is undefined for a deterministic step (eta = 0); use eta > 0")
        return gaussian_kl(mean, s, ref_mean, s)

    def initial_noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        device = device if device is not None else self._device()
        return torch.randn((n, *self.sample_shape), generator=generator, device=device, dtype=self._dtype())

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        which: str = "policy",
        with_reference: bool = True,
        initial: torch.Tensor | None = None,
    ) -> Trajectory:
        """Sample n chains with the policy (or the reference), keeping states, per-step log-probs of the taken
        steps under policy and reference, and per-step exact KLs. Runs without gradients. ``initial`` [n, *shape]:
        the start noise x_T (None: drawn from ``generator``), e.g. shared by the two chains of a D3PO pair."""
        device = self._device()
        if initial is None:
            x = self.initial_noise(n, generator, device)
        else:
            if tuple(initial.shape) != (n, *self.sample_shape):
                raise ValueError(f"initial noise of shape {tuple(initial.shape)} for {n} chains of shape "
                                 f"{self.sample_shape}; expected {(n, *self.sample_shape)}")
            x = initial.to(device=device, dtype=self._dtype())
        states = [x]
        logp, ref_logp, kls = [], [], []
        for k in range(self.num_steps):
            mean = self.step_mean(x, k, cond, which)
            sigma = self.sigma(k)
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
            x_next = mean + sigma * noise if sigma > 0 else mean
            if with_reference:
                ref_mean = mean if which == "reference" else self.step_mean(x, k, cond, "reference")
                pol_mean = mean if which == "policy" else self.step_mean(x, k, cond, "policy")
                if sigma > 0:
                    logp.append(gaussian_log_prob(x_next, pol_mean, sigma))
                    ref_logp.append(gaussian_log_prob(x_next, ref_mean, sigma))
                    kls.append(gaussian_kl(pol_mean, sigma, ref_mean, sigma))
            x = x_next
            states.append(x)
        zeros = torch.zeros(n, self.num_steps, device=device)
        stack = lambda v: torch.stack(v, 1) if v else zeros  # noqa: E731
        return Trajectory(torch.stack(states, 1), cond, stack(logp), stack(ref_logp), stack(kls))

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return self._abar.device

    def _dtype(self) -> torch.dtype:
        state_dtype = getattr(getattr(self.model, "module", self.model), "state_dtype", None)
        if state_dtype is not None:  # a wrapper that keeps states in one dtype and casts for its network
            return state_dtype
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
