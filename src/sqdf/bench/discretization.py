"""Discretization robustness: a fine-tuned network evaluated under samplers and step counts it was not trained with.

A method fine-tunes one network at one sampler setting: DDPO, SQDF and the other discrete-time methods train the
policy's DDIM chain (DDPM at eta = 1) at the task's ``num_inference_steps``; Score as Action trains the
Euler-Maruyama (EM) discretization of the reverse SDE at ``method.num_steps`` (0: the same count). Any epsilon
network defines the reverse SDE (score a = -eps / sqrt(1 - abar_t)), so every fine-tuned network can be run through
every sampler at every step count T (evenly spaced grids from N-1 to 0):

- ``ddpm``: the policy's own DDIM chain (same ``ScheduleConfig``, eta and clip) rebuilt at T steps around the same
  networks (``with_steps``); path KL = the exact sum of per-step Gaussian KLs (undefined at eta = 0).
- ``em``: Euler-Maruyama on the reverse SDE; path KL = the Girsanov sum, exact for EM chains.
- ``heun``: the stochastic Heun solver (``sde.sample_sde(solver="heun")``); path KL = the Girsanov sum along its path,
  a Riemann estimate of the SDE path KL (its steps are not Gaussian, so it has no exact KL).
- ``ode``: the probability-flow ODE with Heun steps; deterministic, so no path KL and no path regret: reward,
  x0 regret and mode TV only.

Per setting: reward mean (the task's true reward), path KL, regret J* - (E[r] - alpha KL) (with standard errors
over the n samples) and the task's sample metrics (``task.evaluate``: x0 KL by kNN, x0 regret
J* - (E[r] - alpha x0 KL), mode TV, energy distance). The x0 regret depends on the samples only, not on how the
sampler's path KL is computed, so it is the column that compares samplers most fairly. Every setting draws its
conditions and noise from a generator seeded with ``seed``: all methods see the same random numbers.

``sqdf bench --discretization 10,20,50,100`` evaluates every finished run this way (``discretization_study``).
"""

from __future__ import annotations

import time

import torch

from ..diffusion.policy import DiffusionPolicy
from ..diffusion.schedule import FlowMatchSchedule, NoiseSchedule, spaced_timesteps
from ..errors import ConfigError
from ..evaluation.metrics import objective_terms

SAMPLERS = ("ddpm", "em", "heun", "ode")
SAMPLER_LABELS = {"ddpm": "DDPM", "em": "EM", "heun": "Heun", "ode": "ODE (Heun)"}
KL_KINDS = {"ddpm": "exact (sum of Gaussian step KLs)", "em": "exact (Girsanov sum of EM steps)",
            "heun": "estimate (Girsanov sum along the Heun path)", "ode": None}
DEFAULT_STEPS = (10, 20, 50, 100)
DEFAULT_SAMPLES = 4096
DEFAULT_SEED = 0
FLOOR = "exact-score floor"  # the "method" of the rows of the exact target score (the sampler's own cost)


# ---- settings ------------------------------------------------------------------------------------------------
def parse_steps(text) -> tuple[int, ...]:
    """Step counts from '10,20,50,100' (or an iterable of ints/strings), sorted, without repeats; each >= 1."""
    items = text.split(",") if isinstance(text, str) else list(text)
    steps = []
    for item in items:
        word = str(item).strip()
        if not word:
            continue
        try:
            value = int(word)
        except ValueError:
            raise ConfigError(f"--discretization {text!r}: {word!r} is not a whole number of sampler steps; "
                              "pass a comma-separated list such as 10,20,50,100") from None
        if value < 1:
            raise ConfigError(f"--discretization {text!r}: {value} steps is not allowed; every step count must be "
                              ">= 1, e.g. 10,20,50,100")
        steps.append(value)
    if not steps:
        raise ConfigError(f"--discretization {text!r} names no step count; pass e.g. 10,20,50,100")
    return tuple(sorted(set(steps)))


def check_samplers(samplers) -> tuple[str, ...]:
    """The samplers as a tuple, or a ConfigError naming the unknown one."""
    samplers = tuple(samplers)
    for s in samplers:
        if s not in SAMPLERS:
            raise ConfigError(f"sampler {s!r} is not one of {SAMPLERS}")
    return samplers


def with_steps(policy: DiffusionPolicy, num_steps: int) -> DiffusionPolicy:
    """A policy with the same networks (model, frozen reference or the model's adapters, consistency model) and the
    same schedule (ScheduleConfig, eta, clip; flow: shift), rebuilt on an evenly spaced grid of num_steps steps.
    Nothing is copied: the new policy shares every module with the old one."""
    schedule = policy.schedule
    if isinstance(schedule, NoiseSchedule):
        new = NoiseSchedule(schedule.config, num_steps, schedule.eta, clip_sample=schedule.clip_sample,
                            clip_sample_mode=schedule.clip_sample_mode)
    elif isinstance(schedule, FlowMatchSchedule):
        new = FlowMatchSchedule(num_steps, schedule.eta, schedule.shift, schedule.num_train_steps, schedule.step)
    else:
        raise ConfigError(f"with_steps supports NoiseSchedule and FlowMatchSchedule policies, not "
                          f"{type(schedule).__name__} (e.g. RLCM's consistency sampler); evaluate that method with "
                          "its own sampler")
    # reference=None means "the model with its adapters off" for an adapter policy (no copy); else pass ours,
    # since None would deep-copy the (fine-tuned) model.
    reference = None if policy._adapter_reference else policy.reference
    out = DiffusionPolicy(policy.model, new, policy.sample_shape, reference=reference,
                          prediction_type=policy.prediction_type)
    if policy.consistency_model is not None:
        out.attach_consistency_model(policy.consistency_model)
    return out


def training_setting(method) -> tuple[str, int] | None:
    """(sampler, steps) a trained method fine-tuned its network with, or None when the method trains nothing or
    samples with something other than the policy's DDIM chain or the reverse SDE (RLCM's consistency sampler)."""
    from ..methods.score_as_action import ScoreAsAction

    policy = method.policy
    if not method.trains or type(policy) is not DiffusionPolicy or not isinstance(policy.schedule, NoiseSchedule):
        return None
    if isinstance(method, ScoreAsAction):
        return "em", method.config.num_steps or policy.num_steps
    return "ddpm", policy.num_steps


# ---- one setting ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_setting(policy: DiffusionPolicy, sampler: str, steps: int, n: int, cond, generator: torch.Generator):
    """(samples [n, *shape], path KL [n] or None) of the policy's network under one sampler at `steps` steps."""
    policy.eval()
    if sampler == "ddpm":
        chain = with_steps(policy, steps)
        traj = chain.sample(n, cond, generator)
        return traj.samples, (None if chain.schedule.eta == 0 else traj.path_kl)
    from ..diffusion.sde import sample_sde

    num_train = len(policy.schedule.alphas_cumprod)
    solver = {"em": "em", "heun": "heun", "ode": "ode-heun"}[sampler]
    path = sample_sde(policy, n, cond, generator, spaced_timesteps(num_train, steps), solver,
                      with_kl=sampler != "ode")
    return path.samples, path.path_kl


def setting_metrics(task, samples: torch.Tensor, path_kl: torch.Tensor | None, cond, optimum) -> dict:
    """Reward, path KL, objective and regret (with standard errors over the samples) plus the task's sample metrics
    (numbers only). optimum: task.known_optimum() or None."""
    with torch.no_grad():
        rewards = task.reward(samples, cond).detach().to(torch.float64)
    kl = path_kl if path_kl is not None else torch.full_like(rewards, float("nan"))
    out = objective_terms(rewards, kl, task.alpha)
    if path_kl is None:
        out.update({k: None for k in ("path_kl", "path_kl_stderr", "objective", "objective_stderr")})
    out["regret"] = out["regret_stderr"] = None
    if optimum is not None and out["objective"] is not None:
        out["regret"] = optimum.optimum - out["objective"]
        out["regret_stderr"] = (out["objective_stderr"] ** 2 + (optimum.optimum_stderr or 0.0) ** 2) ** 0.5
    out.update({k: float(v) for k, v in task.evaluate(samples, cond).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def evaluate_policy(policy: DiffusionPolicy, task, steps=DEFAULT_STEPS, samplers=SAMPLERS, n: int = DEFAULT_SAMPLES,
                    seed: int = DEFAULT_SEED, trained: tuple[str, int] | None = None) -> list[dict]:
    """One row per (sampler, steps): {"sampler", "steps", "trained" (the method's own setting), "kl_kind",
    "optimum", "seconds", reward/KL/regret with stderrs, task metrics}. ``trained``: (sampler, steps) of training
    or None."""
    from ..diffusion.sde import check_vp

    check_vp(policy)
    samplers = check_samplers(samplers)
    num_train = len(policy.schedule.alphas_cumprod)
    for t in steps:
        if not 1 <= t < num_train:
            raise ConfigError(f"{t} sampler steps: step counts must be in [1, {num_train}) (the schedule's training "
                              "timesteps)")
    optimum = task.known_optimum()
    device = policy._device()
    rows = []
    for sampler in samplers:
        for t in steps:
            g = torch.Generator(device=device).manual_seed(seed)
            cond = task.sample_conditions(n, g)
            if cond is not None:
                cond = cond.to(device)
            start = time.time()
            samples, path_kl = sample_setting(policy, sampler, t, n, cond, g)
            row = {"sampler": sampler, "steps": t, "trained": trained == (sampler, t),
                   "kl_kind": None if path_kl is None else KL_KINDS[sampler],
                   "optimum": None if optimum is None else optimum.optimum}
            row.update(setting_metrics(task, samples, path_kl, cond, optimum))
            row["seconds"] = round(time.time() - start, 3)
            rows.append(row)
    return rows


def evaluate_run(run, steps=DEFAULT_STEPS, samplers=SAMPLERS, n: int = DEFAULT_SAMPLES,
                 seed: int = DEFAULT_SEED) -> list[dict]:
    """``evaluate_policy`` of a finished run (a ``sampling.LoadedRun``, or any object with .policy, .method and
    .task), marking its training setting. ConfigError for a method that has none (inference-time, RLCM)."""
    trained = training_setting(run.method)
    if trained is None:
        raise ConfigError(f"method {run.method.name} has no fine-tuned DDIM/SDE network to re-discretize (it trains "
                          "nothing or samples with its own sampler); leave it out of the discretization study")
    return evaluate_policy(run.policy, run.task, steps, samplers, n, seed, trained)


def exact_score_policy(task, schedule: NoiseSchedule | None = None) -> DiffusionPolicy | None:
    """The exact target score as the policy and the exact base score as the reference (what a perfect fine-tune
    would be), on the task's schedule; None when the task has no mixture target. Its rows are the regret the
    sampler itself costs."""
    from ..models.denoisers import MixtureScoreDenoiser

    target = getattr(task, "target_mixture", None)
    if target is None:
        return None
    schedule = schedule or task.make_schedule()
    abar = schedule.alphas_cumprod
    return DiffusionPolicy(MixtureScoreDenoiser(target, abar), schedule, task.sample_shape,
                           reference=MixtureScoreDenoiser(task.base, abar))
