"""DiffusionPolicy on tiny denoisers: trajectories, log-probs, KLs, step means, reparameterized steps,
exact-score denoisers and the Tweedie estimator."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from sqdf.diffusion.estimators import TweedieEstimator, make_estimator
from sqdf.diffusion.mixture import GaussianMixture
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.errors import ConfigError
from sqdf.models.denoisers import MixtureScoreDenoiser, MLPDenoiser, ResidualDenoiser

N_TRAIN, T, D = 100, 10, 2


def _schedule(eta=1.0):
    return NoiseSchedule(ScheduleConfig(num_train_steps=N_TRAIN), num_inference_steps=T, eta=eta)


def _policy(seed=0, eta=1.0):
    torch.manual_seed(seed)
    model = MLPDenoiser(D, hidden=16, num_layers=2, time_dim=8, num_train_steps=N_TRAIN)
    return DiffusionPolicy(model, _schedule(eta), (D,))


def _perturb(policy, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _posterior_mean(eps, x, a_t, a_p):
    """DDPM posterior mean of q(x_prev | x_t, x0_hat) with x0_hat from eps, in closed form."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    alpha_t = a_t / a_p
    return (math.sqrt(a_p) * (1 - alpha_t) / (1 - a_t)) * x0 + (math.sqrt(alpha_t) * (1 - a_p) / (1 - a_t)) * x


def test_sample_shapes():
    policy = _policy()
    traj = policy.sample(8, generator=torch.Generator().manual_seed(0))
    assert traj.states.shape == (8, T + 1, D)
    assert traj.log_probs.shape == (8, T)
    assert traj.ref_log_probs.shape == (8, T)
    assert traj.kls.shape == (8, T)
    assert traj.samples.shape == (8, D)
    torch.testing.assert_close(traj.samples, traj.states[:, -1])
    assert traj.batch_size == 8
    assert traj.path_kl.shape == (8,)
    assert traj.cond is None


def test_sample_is_reproducible_with_a_generator():
    policy = _policy()
    a = policy.sample(4, generator=torch.Generator().manual_seed(3))
    b = policy.sample(4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.states, b.states)


def test_kl_is_zero_at_init():
    policy = _policy()
    traj = policy.sample(16, generator=torch.Generator().manual_seed(0))
    assert bool((traj.kls == 0).all())
    torch.testing.assert_close(traj.log_probs, traj.ref_log_probs)
    assert bool((traj.path_kl == 0).all())


def test_reference_is_not_a_parameter_and_is_frozen():
    policy = _policy()
    n_model = sum(p.numel() for p in policy.model.parameters())
    assert sum(p.numel() for p in policy.parameters()) == n_model
    assert all(not k.startswith("reference") for k in policy.state_dict())
    assert all(not p.requires_grad for p in policy.reference.parameters())
    assert len(policy.trainable_parameters()) == len(list(policy.model.parameters()))


def test_trajectory_kls_and_log_probs_after_perturbation():
    policy = _policy()
    _perturb(policy)
    traj = policy.sample(12, generator=torch.Generator().manual_seed(0))
    sigmas = policy.schedule.sigmas  # float64, from the schedule
    assert bool((traj.kls > 0).all())
    with torch.no_grad():
        for k in range(T):
            x, x_next = traj.states[:, k], traj.states[:, k + 1]
            m_pol = policy.step_mean(x, k, which="policy")
            m_ref = policy.step_mean(x, k, which="reference")
            s = float(sigmas[k])
            kl = ((m_pol - m_ref) ** 2).sum(1) / (2 * s * s)
            torch.testing.assert_close(traj.kls[:, k], kl, rtol=1e-4, atol=1e-6, check_dtype=False)
            lp = Normal(m_pol, s).log_prob(x_next).sum(1)
            lp_ref = Normal(m_ref, s).log_prob(x_next).sum(1)
            torch.testing.assert_close(traj.log_probs[:, k], lp, rtol=1e-4, atol=1e-4, check_dtype=False)
            torch.testing.assert_close(traj.ref_log_probs[:, k], lp_ref, rtol=1e-4, atol=1e-4, check_dtype=False)
    torch.testing.assert_close(traj.path_kl, traj.kls.sum(1))


def test_sampling_with_the_reference_matches_reference_chain():
    policy = _policy()
    _perturb(policy)
    traj = policy.sample(6, generator=torch.Generator().manual_seed(5), which="reference")
    with torch.no_grad():
        for k in range(T):
            x = traj.states[:, k]
            m_pol = policy.step_mean(x, k)
            m_ref = policy.step_mean(x, k, which="reference")
            s = policy.sigma(k)
            torch.testing.assert_close(traj.kls[:, k], ((m_pol - m_ref) ** 2).sum(1) / (2 * s * s),
                                       rtol=1e-4, atol=1e-6, check_dtype=False)
            torch.testing.assert_close(traj.ref_log_probs[:, k], Normal(m_ref, s).log_prob(traj.states[:, k + 1]).sum(1),
                                       rtol=1e-4, atol=1e-4, check_dtype=False)


def test_step_mean_is_the_ddpm_posterior_mean_at_eta_one():
    policy = _policy()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, D, generator=g)
    abar = policy.schedule.abar
    for k in (0, 4, T - 1):
        t = torch.full((5,), policy.schedule.timesteps[k], dtype=torch.long)
        with torch.no_grad():
            eps = policy.model(x, t, None)
            got = policy.step_mean(x, k)
        expected = _posterior_mean(eps.double(), x.double(), float(abar[k]), float(abar[k + 1]))
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_step_mean_eta_zero_is_ddim_and_step_kl_refuses():
    policy = _policy(eta=0.0)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    abar = policy.schedule.abar
    k = 2
    t = torch.full((3,), policy.schedule.timesteps[k], dtype=torch.long)
    with torch.no_grad():
        eps = policy.model(x, t, None).double()
        got = policy.step_mean(x, k).double()
    a_t, a_p = float(abar[k]), float(abar[k + 1])
    x0 = (x.double() - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(got, math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError):
        policy.step_kl(got, got, k)
    traj = policy.sample(3, generator=torch.Generator().manual_seed(0))
    assert traj.kls.shape == (3, T)  # deterministic chain: zeros, no crash


def test_step_mean_per_sample_k_matches_int_calls():
    policy = _policy()
    _perturb(policy)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    ks = torch.tensor([0, 3, 9, 2, 5, 0])
    with torch.no_grad():
        batched = policy.step_mean(x, ks)
        batched_ref = policy.step_mean(x, ks, which="reference")
        sig = policy.sigma_of(x, ks)
        for i, k in enumerate(ks.tolist()):
            torch.testing.assert_close(batched[i], policy.step_mean(x[i : i + 1], k)[0])
            torch.testing.assert_close(batched_ref[i], policy.step_mean(x[i : i + 1], k, which="reference")[0])
            assert float(sig[i, 0]) == pytest.approx(float(policy.schedule.sigmas[k]), rel=1e-6)


def test_step_mean_rejects_bad_indices():
    policy = _policy()
    x = torch.zeros(2, D)
    with pytest.raises(IndexError):
        policy.step_mean(x, T)
    with pytest.raises(IndexError):
        policy.step_mean(x, torch.tensor([0, -1]))
    with pytest.raises(ValueError):
        policy.step_mean(x, torch.tensor([0, 1, 2]))


def test_reparameterized_step_gradients_reach_policy_only():
    policy = _policy()
    _perturb(policy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, D, generator=g)
    noise = torch.randn(4, D, generator=g)
    k = torch.tensor([0, 1, 5, 9])
    x_next, mean, ref_mean = policy.reparameterized_step(x, k, None, noise)
    torch.testing.assert_close(x_next, mean + policy.sigma_of(x, k) * noise)
    assert not ref_mean.requires_grad
    (x_next.sum() + policy.step_kl(mean, ref_mean, k).sum()).backward()
    grads = [p.grad for p in policy.model.parameters()]
    assert all(gr is not None for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(p.grad is None for p in policy.reference.parameters())


def test_step_kl_is_scaled_mean_distance():
    policy = _policy()
    g = torch.Generator().manual_seed(9)
    m1, m2 = torch.randn(3, D, generator=g), torch.randn(3, D, generator=g)
    k = torch.tensor([0, 4, 9])
    s = policy.schedule.sigmas[k].float()
    torch.testing.assert_close(policy.step_kl(m1, m2, k), ((m1 - m2) ** 2).sum(1) / (2 * s**2), check_dtype=False)


# ---- exact-score and residual denoisers ----------------------------------------------------------------------


def _mixture():
    return GaussianMixture(
        torch.tensor([[-2.0, 0.0], [1.0, 1.5], [2.0, -1.0]], dtype=torch.float64),
        torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.5, 0.0], [0.0, 0.5]], [[0.2, -0.05], [-0.05, 0.4]]],
                     dtype=torch.float64),
        torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mixture_score_denoiser_eps(dtype):
    mix = _mixture()
    sch = _schedule()
    den = MixtureScoreDenoiser(mix, sch.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64) * 2
    t = torch.tensor([0, 99, 50, 50, 10, 99, 0])
    out = den(x.to(dtype), t)
    assert out.dtype == dtype
    for i in range(7):
        a = float(sch.alphas_cumprod[t[i]])
        expected = -math.sqrt(1 - a) * mix.noised(a).score(x[i : i + 1])[0]
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                   atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_mixture_score_denoiser_eps_against_autograd_of_noised_density():
    mix = _mixture()
    sch = _schedule()
    den = MixtureScoreDenoiser(mix, sch.alphas_cumprod)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = float(sch.alphas_cumprod[30])
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(mix.noised(a).log_prob(xg).sum(), xg)
    torch.testing.assert_close(den(x, torch.full((5,), 30)), -math.sqrt(1 - a) * score)


def test_residual_denoiser_with_zero_init_equals_base():
    mix = _mixture()
    sch = _schedule()
    base = MixtureScoreDenoiser(mix, sch.alphas_cumprod)
    corr = MLPDenoiser(2, hidden=16, num_layers=2, num_train_steps=N_TRAIN, zero_init=True)
    res = ResidualDenoiser(base, corr)
    assert res.prediction_type == "epsilon"
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 10, 20, 50, 80, 99])
    torch.testing.assert_close(res(x, t), base(x, t))
    # a policy on the residual model equals a policy on the exact base: zero KL
    policy = DiffusionPolicy(res, sch, (2,), reference=base)
    traj = policy.sample(8, generator=torch.Generator().manual_seed(0))
    assert float(traj.kls.abs().max()) < 1e-10
    # and the correction is trainable
    assert len(policy.trainable_parameters()) == len(list(corr.parameters()))


# ---- Tweedie estimator ---------------------------------------------------------------------------------------


def test_tweedie_estimator_final_step_returns_x():
    policy = _policy()
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    est = TweedieEstimator()
    assert torch.equal(est(policy, x, T), x)
    assert torch.equal(est(policy, x, torch.full((4,), T)), x)
    assert isinstance(make_estimator("tweedie"), TweedieEstimator)
    with pytest.raises(ConfigError):
        make_estimator("consistency-nope")


def test_tweedie_estimator_uses_reference_and_passes_gradients():
    policy = _policy()
    _perturb(policy)  # policy != reference, so using the wrong network would show
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, D, generator=g).requires_grad_(True)
    ks = torch.tensor([0, 4, T, 9, T])
    est = TweedieEstimator()(policy, x, ks)
    abar = policy.schedule.abar
    with torch.no_grad():
        for i, k in enumerate(ks.tolist()):
            xi = x[i : i + 1]
            if k == T:
                torch.testing.assert_close(est[i], x[i])
                continue
            t = torch.tensor([policy.schedule.timesteps[k]])
            eps_ref = policy.reference(xi, t, None)
            eps_pol = policy.model(xi, t, None)
            a = float(abar[k])
            expected = (xi - math.sqrt(1 - a) * eps_ref) / math.sqrt(a)
            torch.testing.assert_close(est[i : i + 1], expected, rtol=1e-4, atol=1e-5)
            wrong = (xi - math.sqrt(1 - a) * eps_pol) / math.sqrt(a)
            assert float((est[i : i + 1] - wrong).abs().max()) > 1e-3
    est.sum().backward()
    assert x.grad is not None
    # identity rows at k == T
    torch.testing.assert_close(x.grad[2], torch.ones(D))
    torch.testing.assert_close(x.grad[4], torch.ones(D))
    # non-trivial Jacobian elsewhere: d x0/dx = (I - sqrt(1-a) d eps/dx) / sqrt(a), not the identity
    assert float((x.grad[0] - 1).abs().max()) > 1e-3
    assert all(p.grad is None for p in policy.reference.parameters())


def test_clip_sample_clamps_x0_and_keeps_the_state_identity():
    """With clip_sample, x0_hat is clamped and eps_hat recomputed so that x = sqrt(a) x0_hat + sqrt(1-a) eps_hat."""
    import pytest

    from sqdf.diffusion.policy import DiffusionPolicy
    from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
    from sqdf.errors import ConfigError
    from sqdf.models import MLPDenoiser

    torch.manual_seed(0)
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine"), 10, 1.0, clip_sample=1.0)
    policy = DiffusionPolicy(MLPDenoiser(dim=3), schedule, (3,))
    x = 5 * torch.randn(64, 3)
    for k in (0, 4, 9):
        with torch.no_grad():
            eps, x0 = policy.predict(x, k)
        a = policy.abar(k)
        assert float(x0.abs().max()) <= 1.0
        assert torch.allclose(a**0.5 * x0 + (1 - a) ** 0.5 * eps, x, atol=1e-4)
    with pytest.raises(ConfigError, match="clip_sample"):
        NoiseSchedule(ScheduleConfig(), 10, 1.0, clip_sample=0.0)


@pytest.mark.parametrize("mode,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 1.0), ("ddpm", 0.5)])
def test_clip_sample_modes_match_diffusers_ddim(mode, eta):
    """'ddim' keeps the network's eps beside the clamped x0 (DDIMScheduler's default); 'ddpm' recomputes eps from
    the clamped x0 (DDIMScheduler with use_clipped_model_output=True; DDPM's posterior mean at eta 1)."""
    from diffusers import DDIMScheduler

    from sqdf.diffusion.policy import DiffusionPolicy
    from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
    from sqdf.models import MLPDenoiser

    torch.manual_seed(0)
    grid = list(range(900, -1, -100))
    schedule = NoiseSchedule(ScheduleConfig(), timesteps=grid, eta=eta, clip_sample=1.0, clip_sample_mode=mode)
    policy = DiffusionPolicy(MLPDenoiser(dim=3), schedule, (3,))
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=False)
    ref.set_timesteps(len(grid))  # 900, 800, ..., 0: each of our steps k is diffusers' step from grid[k]
    assert ref.timesteps.tolist()[:-1] == grid[:-1]
    x = 3 * torch.randn(16, 3)
    for k in (2, 5, 8):
        t = grid[k]
        with torch.no_grad():
            mean = policy.step_mean(x, k)
            eps_model = policy.model(x, torch.full((16,), t))
        out = ref.step(eps_model, t, x, eta=eta, use_clipped_model_output=(mode == "ddpm"),
                       variance_noise=torch.zeros_like(x)).prev_sample
        a = float(ref.alphas_cumprod[t])
        assert float((((x - (1 - a) ** 0.5 * eps_model) / a**0.5).abs() > 1).float().mean()) > 0.1  # clamps apply
        torch.testing.assert_close(mean, out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="clip_sample_mode='clip'"):
        NoiseSchedule(ScheduleConfig(), 10, clip_sample=1.0, clip_sample_mode="clip")
