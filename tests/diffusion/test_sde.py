"""Continuous-time VP SDE sampling (sqdf.diffusion.sde) against closed forms: EM step KLs, the Girsanov path KL against
the DDPM sampler's, the exact laws of EM / Heun / ODE steps on Gaussian data, and mixture marginals."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.diffusion.mixture import GaussianMixture
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import (
    FlowMatchSchedule,
    NoiseSchedule,
    ScheduleConfig,
    gaussian_kl,
    gaussian_log_prob,
    spaced_timesteps,
)
from sqdf.diffusion.sde import (
    SOLVERS,
    em_log_ratio,
    em_mean,
    girsanov_kl,
    girsanov_step_kl,
    random_timesteps,
    sample_sde,
    terminal_tweedie,
    vp_increments,
)
from sqdf.errors import ConfigError
from sqdf.models.denoisers import MixtureScoreDenoiser, MLPDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")

N = 1000
SCHEDULE = NoiseSchedule(ScheduleConfig(num_train_steps=N), num_inference_steps=20)
ABAR = SCHEDULE.alphas_cumprod


def _gaussian(mean, std, d=2) -> GaussianMixture:
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(1, d)
    return GaussianMixture(m, (std**2 * torch.eye(d, dtype=torch.float64))[None], torch.ones(1, dtype=torch.float64))


def _exact_policy(data: GaussianMixture, ref: GaussianMixture | None = None, schedule=SCHEDULE) -> DiffusionPolicy:
    """Policy = the exact score of `data`, reference = the exact score of `ref` (default: the same)."""
    ref = data if ref is None else ref
    return DiffusionPolicy(MixtureScoreDenoiser(data, schedule.alphas_cumprod), schedule, (data.dim,),
                           reference=MixtureScoreDenoiser(ref, schedule.alphas_cumprod))


def _mlp_policy(seed=0) -> DiffusionPolicy:
    """A float64 MLP policy whose reference is a perturbed copy (so policy and reference scores differ)."""
    torch.manual_seed(seed)
    model = MLPDenoiser(2, hidden=16, num_layers=2, time_dim=8, num_train_steps=N).double()
    policy = DiffusionPolicy(model, SCHEDULE, (2,))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


# ---- grids and pure math ---------------------------------------------------------------------------------------
def test_increments_are_log_abar_differences_and_add_up():
    ts = spaced_timesteps(N, 7)
    inc = vp_increments(ABAR, ts)
    assert inc.shape == (7,) and inc.dtype == torch.float64 and bool((inc > 0).all())
    assert float(inc[2]) == pytest.approx(math.log(ABAR[ts[3]]) - math.log(ABAR[ts[2]]), rel=1e-12)
    # integral of beta from 0 to N-1: independent of the grid
    assert float(inc.sum()) == pytest.approx(float(torch.log(ABAR[0] / ABAR[N - 1])), rel=1e-12)
    assert float(vp_increments(ABAR, [N - 1, 0]).sum()) == pytest.approx(float(inc.sum()), rel=1e-12)


def test_random_timesteps_are_jittered_strictly_decreasing_grids_with_fixed_ends():
    grids = [random_timesteps(N, 10, torch.Generator().manual_seed(s)) for s in range(5)]
    for ts in grids:
        assert len(ts) == 11 and ts[0] == N - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert len({tuple(ts) for ts in grids}) == 5  # they differ between seeds
    assert random_timesteps(N, 10, torch.Generator().manual_seed(3)) == grids[3]  # reproducible
    ts = random_timesteps(20, 19, torch.Generator().manual_seed(0))  # the densest grid: every timestep
    assert ts == list(range(19, -1, -1))


def test_em_step_kl_is_half_increment_times_squared_action_gap():
    """KL(N(m_p, B I) || N(m_q, B I)) with m = x + B x / 2 + B a is exactly (1/2) B ||a_p - a_q||^2."""
    policy = _mlp_policy()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t, b in ((999, 0.7), (40, 0.02), (3, 1e-4)):
        a_p = policy.score_at(x, t)
        a_q = policy.score_at(x, t, which="reference")
        exact = gaussian_kl(em_mean(x, a_p, b), math.sqrt(b), em_mean(x, a_q, b), math.sqrt(b))
        torch.testing.assert_close(girsanov_step_kl(a_p, a_q, b), exact, rtol=1e-9, atol=1e-12)
        assert bool((exact > 0).all())


def test_sampled_em_paths_carry_exact_step_kls_log_probs_and_log_ratios():
    policy = _mlp_policy()
    out = sample_sde(policy, 8, generator=torch.Generator().manual_seed(1), solver="em")
    T = SCHEDULE.num_steps
    assert out.states.shape == (8, T + 1, 2) and out.scores.shape == out.ref_scores.shape == out.noises.shape
    assert out.step_kls.shape == out.log_probs.shape == (8, T) and out.path_kl.shape == (8,)
    for k in range(T):
        x, b = out.states[:, k], float(out.increments[k])
        mean_p = em_mean(x, policy.score_at(x, out.timesteps[k]), b)
        mean_q = em_mean(x, policy.score_at(x, out.timesteps[k], which="reference"), b)
        torch.testing.assert_close(out.states[:, k + 1], mean_p + math.sqrt(b) * out.noises[:, k])
        torch.testing.assert_close(out.step_kls[:, k], gaussian_kl(mean_p, math.sqrt(b), mean_q, math.sqrt(b)))
        torch.testing.assert_close(out.log_probs[:, k], gaussian_log_prob(out.states[:, k + 1], mean_p, math.sqrt(b)))
    torch.testing.assert_close(out.path_kl, girsanov_kl(out.scores, out.ref_scores, out.increments))
    # the log-ratio of the reference's EM steps to the sampler's, on the taken steps, in closed form
    log_ratio = em_log_ratio(out.noises, out.ref_scores, out.scores, out.increments)
    ref_logp = torch.stack([gaussian_log_prob(out.states[:, k + 1], em_mean(out.states[:, k], out.ref_scores[:, k],
                                              float(out.increments[k])), math.sqrt(float(out.increments[k])))
                            for k in range(T)], 1)
    torch.testing.assert_close(log_ratio, ref_logp - out.log_probs)


def test_girsanov_path_kl_converges_to_the_ddpm_samplers_path_kl():
    """Reference N(0, I), policy N(m, I) (both exact): the score gap sqrt(abar_t) m does not depend on x, so both
    path KLs are deterministic. The EM (Girsanov) sum and the DDPM (eta = 1) sum of step KLs approach each other
    and the continuous value (1/2)||m||^2 (abar(0) - abar(N-1)) as the grid is refined."""
    m = torch.tensor([1.0, 0.5], dtype=torch.float64)
    continuous = 0.5 * float(m @ m) * float(ABAR[0] - ABAR[N - 1])
    gaps = []
    for T in (10, 100, 999):
        schedule = NoiseSchedule(ScheduleConfig(num_train_steps=N), num_inference_steps=T)
        policy = _exact_policy(_gaussian(m, 1.0), _gaussian([0.0, 0.0], 1.0), schedule)
        girsanov = sample_sde(policy, 4, generator=torch.Generator().manual_seed(0)).path_kl
        ddpm = policy.sample(4, generator=torch.Generator().manual_seed(0)).path_kl
        assert float(girsanov.std()) < 1e-5 and float(ddpm.std()) < 1e-3 * float(ddpm.mean())
        gaps.append(abs(float(girsanov.mean()) - float(ddpm.mean())))
        if T == 999:
            assert float(girsanov.mean()) == pytest.approx(continuous, abs=3e-3)
            assert float(ddpm.mean()) == pytest.approx(continuous, abs=1e-2)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2


# ---- solvers on Gaussian data: the exact law of each discrete sampler ---------------------------------------------
def _exact_law(solver: str, ts: list[int], mean: float, std: float) -> tuple[float, float]:
    """(mean, variance) per dimension of a solver's output for data N(mean, std^2) and its exact score
    a(t, x) = -(x - sqrt(abar_t) mean) / v_t, v_t = abar_t std^2 + 1 - abar_t: every step is affine in (x, z)."""
    inc = vp_increments(ABAR, ts).tolist()
    c = 0.5 if solver.startswith("ode") else 1.0
    noise = 0.0 if solver.startswith("ode") else 1.0
    mu, var = 0.0, 1.0

    def drift(t, b):  # the B-weighted drift 1/2 B y + c B a(t, y) = A y + r
        a_t = float(ABAR[t])
        v = a_t * std**2 + 1 - a_t
        return b * (0.5 - c / v), c * b * math.sqrt(a_t) * mean / v

    for k, b in enumerate(inc):
        A, r = drift(ts[k], b)
        coef_x, shift, coef_z = 1 + A, r, noise * math.sqrt(b)  # x' = coef_x x + shift + coef_z z
        if solver in ("heun", "ode-heun") and k < len(inc) - 1:
            A2, r2 = drift(ts[k + 1], b)  # corrector: x + (D(x) + D(x~)) / 2 + sqrt(B) z, x~ the Euler step
            coef_x, shift = 1 + 0.5 * (A + A2 * (1 + A)), 0.5 * (r + A2 * r + r2)
            coef_z = noise * math.sqrt(b) * (1 + 0.5 * A2)
        mu, var = coef_x * mu + shift, coef_x**2 * var + coef_z**2
    return mu, var


@pytest.mark.parametrize("solver", SOLVERS)
def test_each_solver_follows_its_exact_affine_law_on_gaussian_data(solver):
    mean, std = 2.0, 0.5
    policy = _exact_policy(_gaussian([mean, -mean], std))
    ts = spaced_timesteps(N, 8)
    x = sample_sde(policy, 20000, generator=torch.Generator().manual_seed(0), timesteps=ts, solver=solver,
                   with_kl=False).samples.double()
    mu, var = _exact_law(solver, ts, mean, std)
    se_mean, se_var = math.sqrt(var / 20000), var * math.sqrt(2 / 20000)
    torch.testing.assert_close(x.mean(0), torch.tensor([mu, -mu], dtype=torch.float64), atol=5 * se_mean, rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor([var, var], dtype=torch.float64), atol=5 * se_var, rtol=0)


def test_heun_is_closer_than_euler_at_few_steps():
    """At 10 steps the second-order solvers' output laws are closer to the true marginal N(sqrt(a0) m,
    a0 s^2 + 1 - a0) than the first-order ones' (closed forms, checked against sampling above)."""
    mean, std, a0 = 2.0, 0.5, float(ABAR[0])
    true_mu, true_var = math.sqrt(a0) * mean, a0 * std**2 + 1 - a0
    ts = spaced_timesteps(N, 10)
    err = {s: (abs(_exact_law(s, ts, mean, std)[0] - true_mu), abs(_exact_law(s, ts, mean, std)[1] - true_var))
           for s in SOLVERS}
    assert err["heun"][1] < 0.3 * err["em"][1]
    assert err["ode-heun"][0] < 0.3 * err["ode-euler"][0] and err["ode-heun"][1] < 0.3 * err["ode-euler"][1]
    # and every solver converges: on the densest grid all are within 1% of the true law
    ts = spaced_timesteps(N, N - 1)
    for s in SOLVERS:
        mu, var = _exact_law(s, ts, mean, std)
        assert mu == pytest.approx(true_mu, rel=1e-2) and var == pytest.approx(true_var, rel=1e-2), s


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_reproduce_a_mixture_base_with_its_exact_score(solver):
    base = GaussianMixture(torch.tensor([[-2.0, 0.0], [1.5, 1.0]], dtype=torch.float64),
                           torch.stack([0.3 * torch.eye(2), torch.diag(torch.tensor([0.5, 0.2]))]).double(),
                           torch.tensor([0.3, 0.7], dtype=torch.float64))
    policy = _exact_policy(base)
    out = sample_sde(policy, 6000, generator=torch.Generator().manual_seed(2), timesteps=spaced_timesteps(N, 150),
                     solver=solver)
    x = out.samples.double()
    ref = base.sample(200_000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x.mean(0), ref.mean(0), atol=0.06, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.cov(ref.T), atol=0.12, rtol=0)
    assert float(out.path_kl.abs().max()) < 1e-6  # policy = reference: no KL along any path
    assert (out.noises is None) == solver.startswith("ode")
    assert (out.log_probs is None) == (solver != "em")


# ---- API ------------------------------------------------------------------------------------------------------
def test_predict_at_on_the_grid_matches_predict_and_score_is_minus_eps_over_noise():
    policy = _mlp_policy()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in (0, 7, SCHEDULE.num_steps):
        t = SCHEDULE.timesteps[k]
        eps, x0 = policy.predict(x, k)
        eps_at, x0_at = policy.predict_at(x, t)
        torch.testing.assert_close(eps_at, eps, rtol=0, atol=0)
        torch.testing.assert_close(x0_at, x0, rtol=0, atol=0)
        torch.testing.assert_close(policy.score_at(x, torch.full((5,), t)), -eps / math.sqrt(1 - float(ABAR[t])))
    # off the grid, per-sample timesteps
    t = torch.tensor([1, 13, 500, 998, 0])
    eps, _ = policy.predict_at(x, t, which="reference")
    assert eps.shape == (5, 2)
    with pytest.raises(IndexError, match="999"):
        policy.predict_at(x, N)


def test_terminal_tweedie_is_the_exact_conditional_mean_on_gaussian_data():
    mean, std = 1.0, 0.7
    policy = _exact_policy(_gaussian([mean, mean], std))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a_e, t = float(ABAR[0]), 300
    a_t = float(ABAR[t])
    got = terminal_tweedie(x, policy.score_at(x, t).double(), ABAR[t].expand(6), a_e)
    rho, mu_e, v_e = a_t / a_e, math.sqrt(a_e) * mean, a_e * std**2 + 1 - a_e
    expected = mu_e + math.sqrt(rho) * v_e / (rho * v_e + 1 - rho) * (x - math.sqrt(rho) * mu_e)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terminal_tweedie(x, policy.score_at(x, 0).double(), ABAR[0].expand(6), a_e), x)


def test_shapes_without_kl_and_clear_errors():
    policy = _mlp_policy()
    out = sample_sde(policy, 3, generator=torch.Generator().manual_seed(0), timesteps=[999, 500, 20, 0],
                     solver="ode-heun", with_kl=False)
    assert out.states.shape == (3, 4, 2) and out.samples.shape == (3, 2) and out.scores.shape == (3, 3, 2)
    assert out.path_kl is None and out.step_kls is None and out.ref_scores is None and out.noises is None
    with pytest.raises(ConfigError, match="'rk4'"):
        sample_sde(policy, 2, solver="rk4")
    with pytest.raises(ConfigError, match="strictly decreasing"):
        sample_sde(policy, 2, timesteps=[999, 999, 0])
    flow = DiffusionPolicy(MLPDenoiser(2, hidden=8, num_layers=1, time_dim=8), FlowMatchSchedule(4), (2,))
    with pytest.raises(ConfigError, match="supports VP schedules"):
        sample_sde(flow, 2)
