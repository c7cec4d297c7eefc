"""Tasks whose base distribution is a Gaussian mixture: the known-optimum benchmarks and the public API for new ones.

Build one from means, covariances, weights, a differentiable reward callable and alpha::

    task = MixtureTask.from_components(means, covs, weights, reward=my_reward, alpha=1.0)
    task.known_optimum()        # J* (closed form for quadratic rewards, else Monte Carlo with a stated error)
    task.target_samples(1000)   # exact samples of p* ∝ p_ref exp(r / alpha)
    task.sampling_floor(20)     # what the sampler itself costs: the exact target score run at 20 steps
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..diffusion.mixture import GaussianMixture, QuadraticReward, TiltedMixture, tilt_mixture
from ..diffusion.schedule import NoiseSchedule
from ..errors import ConfigError
from ..evaluation.metrics import (
    energy_distance,
    log_mean_exp,
    mode_weights,
    objective_terms,
    sample_kl,
    spread_ratio,
    total_variation,
)
from ..models.denoisers import MixtureScoreDenoiser, MLPDenoiser, ResidualDenoiser
from .base import KnownOptimum, Task, TaskConfig

NUMERIC_SAMPLES = 1 << 20
EVAL_TARGET_SAMPLES = 2000


@dataclass
class ExactTarget:
    """A target known exactly as a mixture, with log Z = log E_ref[exp(r/alpha)] known (e.g. a density ratio)."""

    mixture: GaussianMixture
    log_z: float


class MixtureTask(Task):
    """Base p_ref = a Gaussian mixture; reward any differentiable callable; optimum p* ∝ p_ref exp(r/alpha).

    Args:
        base: the base mixture.
        reward: r(x [B, d], cond) -> [B]. A ``QuadraticReward`` gives every optimum quantity in closed form.
        alpha: KL weight (> 0).
        exact_target: when the tilted target is known to be a given mixture (density-ratio rewards).
        config: shared task options (base model kind, sampler steps, schedule).
    """

    def __init__(
        self,
        base: GaussianMixture,
        reward: Callable,
        alpha: float,
        config: TaskConfig | None = None,
        name: str = "mixture",
        description: str = "",
        exact_target: ExactTarget | None = None,
    ):
        super().__init__(config or TaskConfig())
        if exact_target is not None and self.config.alpha not in (None, alpha):
            raise ConfigError(f"task.alpha={self.config.alpha}: task {name} has a known target only for "
                              f"alpha={alpha}; drop the setting")
        if self.config.alpha is not None:
            alpha = self.config.alpha
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"alpha={alpha} must be a positive number (it weights the KL; try 1.0)")
        self.base = base
        self._reward = reward
        self._alpha = float(alpha)
        self.name = name
        self.description = description
        self._exact_target = exact_target
        self._tilt: TiltedMixture | None = None
        if isinstance(reward, QuadraticReward):
            self._tilt = tilt_mixture(base, reward, self._alpha)
        self._numeric: tuple[KnownOptimum, torch.Tensor] | None = None
        self._eval_targets: torch.Tensor | None = None

    @classmethod
    def from_components(cls, means, covs, weights, reward: Callable, alpha: float, **kwargs) -> "MixtureTask":
        return cls(GaussianMixture(means, covs, weights), reward, alpha, **kwargs)

    # ---- Task interface --------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.base.dim,)

    @property
    def alpha(self) -> float:
        return self._alpha

    def reward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self._reward(x, cond)

    def build_reference(self, schedule: NoiseSchedule, out_dir: str | None = None) -> nn.Module:
        kind = self.config.base
        if kind == "exact":
            return MixtureScoreDenoiser(self.base, schedule.alphas_cumprod)
        if kind == "mlp":
            return self._mlp_base(schedule, out_dir)
        raise ConfigError(f"task.base={kind!r} must be 'exact' or 'mlp'")

    def build_policy_model(self, reference: nn.Module) -> nn.Module:
        if isinstance(reference, MixtureScoreDenoiser):
            corr = MLPDenoiser(self.base.dim, hidden=128, num_layers=3, zero_init=True,
                               num_train_steps=self.config.num_train_steps)
            return ResidualDenoiser(reference, corr)
        import copy

        model = copy.deepcopy(reference)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def _mlp_base(self, schedule: NoiseSchedule, out_dir: str | None) -> nn.Module:
        from safetensors.torch import load_file, save_file

        from ..models.training import train_denoiser

        model = MLPDenoiser(self.base.dim, hidden=256, num_layers=4, num_train_steps=self.config.num_train_steps)
        path = self.config.base_path or (os.path.join(out_dir, "base_model.safetensors") if out_dir else None)
        if path and os.path.exists(path):
            try:
                model.load_state_dict(load_file(path))
            except Exception as exc:  # noqa: BLE001 - any failure here is a bad file
                raise ConfigError(f"task.base_path={path!r} is not an MLP base for this task ({exc}); "
                                  "delete it to retrain") from exc
        else:
            if self.config.base_train_steps < 1:
                raise ConfigError(f"task.base_train_steps={self.config.base_train_steps} must be >= 1")
            train_denoiser(model, lambda n, g: self.base.sample(n, g), schedule, steps=self.config.base_train_steps,
                           progress=True)
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                tmp = path + ".tmp"
                save_file(model.state_dict(), tmp)
                os.replace(tmp, path)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def consistency_model(self, steps: int | None = None) -> nn.Module:
        """The frozen consistency model f(x, t, cond) -> x0 [B, d] of the exact base (``models.toy_consistency``:
        regression onto the exact probability-flow ODE's endpoints at timestep 0; with task.base='mlp' it is still
        the exact base's). Read from task.consistency_path when that file exists (distilled and written there when
        it does not), else from ~/.cache/sqdf/consistency/<task>-<fingerprint>-s<steps>.safetensors, distilled and
        cached on first use (20-60 s on one CPU core). ``steps``: distillation steps (None: the default, 3000)."""
        import sys

        from ..models import toy_consistency as tc

        steps = tc.DEFAULT_STEPS if steps is None else int(steps)
        abar = self.make_schedule().alphas_cumprod
        fingerprint = tc.mixture_fingerprint(self.base, abar)
        given = self.config.consistency_path
        path = os.path.expanduser(given) if given else tc.default_cache_path(self.name, fingerprint, steps)
        if os.path.exists(path):
            return tc.load_toy_consistency(path, self.base, abar, fingerprint)[0]
        print(f"sqdf: distilling a consistency model of the {self.name} base ({steps} steps; cached in {path})",
              file=sys.stderr, flush=True)
        model = tc.distill_toy_consistency(self.base, abar, steps=steps)
        try:
            tc.save_toy_consistency(model, path, fingerprint, steps=steps, task=self.name)
        except OSError as exc:
            if given:
                raise ConfigError(f"task.consistency_path={given!r} cannot be written ({exc}); point it at a "
                                  "writable place") from exc
            print(f"sqdf: could not cache the consistency model in {path} ({exc}); using it unsaved",
                  file=sys.stderr, flush=True)
        return model

    # ---- the optimum -----------------------------------------------------------------------------------------
    @property
    def target_mixture(self) -> GaussianMixture | None:
        """p* as a mixture when it is one (quadratic reward or a given exact target)."""
        if self._tilt is not None:
            return self._tilt.target
        if self._exact_target is not None:
            return self._exact_target.mixture
        return None

    def soft_value(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                   mc_samples: int = 256) -> torch.Tensor:
        """The exact soft value V*(x, t) = alpha log E_ref[exp(r(x_0)/alpha) | x_t = x] of states x [B, d] at model
        timesteps t [B] (the base mixture's, whatever base network the task trains): closed form when the target is
        a known mixture, else ``mc_samples`` posterior draws per component (fixed seed). Differentiable in x."""
        from ..diffusion.soft_value import exact_soft_value, monte_carlo_soft_value

        if not hasattr(self, "_value_schedule"):
            self._value_schedule = self.make_schedule()
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        signal, noise = self._value_schedule.coefficients_at(t.cpu())
        target = self.target_mixture
        log_z = None if target is None else (self._tilt.log_z if self._tilt is not None else self._exact_target.log_z)
        if target is not None:  # one batched closed form, every sample at its own level
            return exact_soft_value(self.base, target, log_z, self._alpha, x, signal, noise).to(x.dtype)
        rows, values = [], []
        for level in torch.unique(t):
            idx = torch.nonzero(t == level).flatten()
            s, n = float(signal[idx[0].cpu()]), float(noise[idx[0].cpu()])
            v = monte_carlo_soft_value(self.base, self.reward, self._alpha, x[idx], s, n, mc_samples,
                                       torch.Generator().manual_seed(0))
            rows.append(idx)
            values.append(v.to(device=x.device, dtype=x.dtype))
        vals = torch.cat(values)
        return torch.zeros_like(vals).index_copy(0, torch.cat(rows), vals)

    def known_optimum(self) -> KnownOptimum:
        if self._tilt is not None:
            t = self._tilt
            return KnownOptimum(t.optimum, t.reward_mean, t.kl, 0.0, "closed form",
                                t.target.weights.tolist())
        if self._exact_target is not None:
            target = self._exact_target.mixture
            optimum = self._alpha * self._exact_target.log_z
            g = torch.Generator().manual_seed(1234)
            x = target.sample(NUMERIC_SAMPLES // 4, g)
            r = self.reward(x).to(torch.float64)
            r_mean = float(r.mean())
            return KnownOptimum(optimum, r_mean, (r_mean - optimum) / self._alpha, 0.0,
                                f"closed form (E[r], KL by {x.shape[0]} target samples)",
                                self._target_mode_weights(target).tolist())
        return self._numeric_optimum()[0]

    def _numeric_optimum(self) -> tuple[KnownOptimum, torch.Tensor]:
        """J* by Monte Carlo over base samples: alpha log mean exp(r/alpha), with its delta-method stderr."""
        if self._numeric is None:
            g = torch.Generator().manual_seed(1234)
            x = self.base.sample(NUMERIC_SAMPLES, g)
            with torch.no_grad():
                r = self.reward(x).to(torch.float64)
            log_z, se = log_mean_exp(r / self._alpha)
            w = torch.softmax(r / self._alpha, 0)
            r_mean = float((w * r).sum())
            optimum = self._alpha * log_z
            assign = self.base.responsibilities(x).argmax(1)
            weights = torch.zeros(self.base.num_components, dtype=torch.float64).index_add_(0, assign, w)
            opt = KnownOptimum(optimum, r_mean, (r_mean - optimum) / self._alpha, self._alpha * se,
                               f"Monte Carlo, {NUMERIC_SAMPLES} base samples (importance weights)", weights.tolist())
            idx = torch.multinomial(w, EVAL_TARGET_SAMPLES * 4, replacement=True, generator=g)
            self._numeric = (opt, x[idx])
        return self._numeric

    def _target_mode_weights(self, target: GaussianMixture) -> torch.Tensor:
        g = torch.Generator().manual_seed(4321)
        x = target.sample(100_000, g)
        return mode_weights(self.base.responsibilities(x).argmax(1), self.base.num_components)

    def target_samples(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of p* [n, d] float64 (exact for mixture targets, importance resampling otherwise)."""
        target = self.target_mixture
        if target is not None:
            return target.sample(n, generator)
        pool = self._numeric_optimum()[1]
        idx = torch.randint(0, pool.shape[0], (n,), generator=generator)
        return pool[idx]

    def target_log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p*(x) up to a constant, [B]."""
        target = self.target_mixture
        if target is not None:
            return target.log_prob(x)
        return self.base.log_prob(x) + self.reward(x) / self._alpha

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluate(self, samples: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
        x = samples.detach().flatten(1).to(torch.float64).cpu()
        weights = mode_weights(self.base.responsibilities(x).argmax(1), self.base.num_components)
        opt = self.known_optimum()
        if self._eval_targets is None:
            self._eval_targets = self.target_samples(EVAL_TARGET_SAMPLES, torch.Generator().manual_seed(99))
        n = min(x.shape[0], EVAL_TARGET_SAMPLES)
        out = {
            "energy_distance": energy_distance(x[:n], self._eval_targets),
            "spread_ratio": spread_ratio(x, self._eval_targets),
            "mode_weights": [round(float(v), 4) for v in weights],
        }
        if opt.mode_weights is not None:
            out["mode_tv"] = total_variation(weights, torch.tensor(opt.mode_weights))
        # Marginal (x0) KL to the base by a kNN entropy estimate (about +0.01-0.04 nats of bias at 2-4k samples
        # in 2-D): defined for every sampler, including those without a path KL (FK steering).
        with torch.no_grad():
            r = self.reward(x).to(torch.float64)
        x0_kl = sample_kl(x, self.base.log_prob(x))
        out["x0_kl"] = x0_kl
        out["x0_regret"] = opt.optimum - (float(r.mean()) - self._alpha * x0_kl)
        return out

    def sampling_floor(self, num_inference_steps: int | None = None, n: int = 4096, seed: int = 0) -> dict[str, float]:
        """Score the exact target's analytic score run through the same sampler (policy = p*'s score, reference =
        the exact base score): the regret the discretization alone imposes. Needs a mixture target."""
        from ..diffusion.policy import DiffusionPolicy
        from ..diffusion.schedule import ScheduleConfig

        target = self.target_mixture
        if target is None:
            raise ConfigError(f"task {self.name} has no mixture target, so no exact-score floor")
        cfg = ScheduleConfig(kind=self.config.schedule, num_train_steps=self.config.num_train_steps)
        schedule = NoiseSchedule(cfg, num_inference_steps or self.config.num_inference_steps, self.config.eta)
        policy = DiffusionPolicy(
            MixtureScoreDenoiser(target, schedule.alphas_cumprod),
            schedule,
            self.sample_shape,
            reference=MixtureScoreDenoiser(self.base, schedule.alphas_cumprod),
        )
        traj = policy.sample(n, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            rewards = self.reward(traj.samples)
        terms = objective_terms(rewards, traj.path_kl, self._alpha)
        terms["regret"] = self.known_optimum().optimum - terms["objective"]
        terms["num_inference_steps"] = schedule.num_steps
        terms.update({k: v for k, v in self.evaluate(traj.samples).items() if k != "mode_weights"})
        return terms

    def plot(self, samples: torch.Tensor, path: str, title: str = "", cond=None) -> None:
        from ..evaluation.plots import plot_samples_2d

        plot_samples_2d(samples, self, path, title)
