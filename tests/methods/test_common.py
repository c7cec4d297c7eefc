"""The per-step log-ratio the ratio-based methods clip, at an SD1.5 latent's size (d = 4 x 64 x 64 = 16,384):
unchanged parameters give ratio 1 in every batch layout and dtype, and the clip means the same at every size."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import NoiseSchedule
from sqdf.errors import ConfigError
from sqdf.methods.common import check_log_ratio, sample_dim, step_log_ratio, transition_batch
from sqdf.methods.ddpo import DDPOConfig

SHAPE = (4, 64, 64)  # an SD1.5 latent at 512 px


class _ConvDenoiser(nn.Module):
    """A small convolutional epsilon-predictor over [B, 4, 64, 64] latents."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, t, cond=None):
        h = torch.nn.functional.silu(self.inp(x) + (t.float() / 1000)[:, None, None, None])
        return self.out(h)


@pytest.fixture(scope="module")
def latent_policy():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return DiffusionPolicy(_ConvDenoiser(), NoiseSchedule(num_inference_steps=3), SHAPE)


def _rescored(policy, x, x_next, k, order, size):
    """Log-probs of the transitions re-scored in chunks of ``size`` in the given order, put back in place."""
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for start in range(0, len(order), size):
        idx = order[start:start + size]
        with torch.no_grad():
            out[idx] = policy.step_log_prob(x[idx], x_next[idx], k[idx])
    return out


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_unchanged_parameters_give_ratio_one_in_every_layout(latent_policy, autocast):
    """The rollout's stored log-probs against a re-scoring in the layouts the presets use (all transitions at once,
    DDPO's transition chunks, a shuffled minibatch order), float32 and bf16 autocast, both conventions."""
    policy, d = latent_policy, sample_dim(latent_policy)
    assert d == 16384
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    with ctx():
        traj = policy.sample(4, generator=torch.Generator().manual_seed(1))
        assert traj.log_probs.dtype == torch.float64 and float(traj.log_probs.abs().max()) > 1e4
        x, x_next, k = transition_batch(traj.states, torch.arange(4))
        old = traj.log_probs.reshape(-1)
        n = x.shape[0]
        for order, size in [(torch.arange(n), n), (torch.arange(n), 2), (torch.arange(n), 5),
                            (torch.randperm(n, generator=torch.Generator().manual_seed(2)), 4)]:
            new = _rescored(policy, x, x_next, k, order, size)
            for convention in ("mean", "sum"):
                ratio = step_log_ratio(new, old, d, convention).exp()
                assert float((ratio - 1).abs().max()) < 1e-6, (size, convention)


def test_log_prob_sums_are_exact_whatever_the_summation_order():
    """At d = 16,384 a float32 sum of the log-density (about 2e4 in size) is off by ~1e-3 and depends on the
    order of its terms; the float64 accumulation agrees with the exact value, and with itself reordered."""
    from sqdf.diffusion.schedule import gaussian_log_prob

    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, *SHAPE, generator=g)
    x = mean + 0.1 * torch.randn(3, *SHAPE, generator=g)
    exact = gaussian_log_prob(x.double(), mean.double(), 0.1)
    ours = gaussian_log_prob(x, mean, 0.1)
    flipped = gaussian_log_prob(x.flip(-1, -2), mean.flip(-1, -2), 0.1)
    assert ours.dtype == torch.float64 and float(exact.abs().min()) > 1e4
    assert float((ours - exact).abs().max()) < 1e-7
    assert float((ours - flipped).abs().max()) < 1e-7


def test_the_per_dimension_clip_bounds_the_same_change_at_every_size():
    """A parameter change that moves each dimension's log-density by 2e-5 is inside DDPO's clip_range (1e-4) per
    dimension at d = 2 and at d = 16,384; summed, the same change is clipped at SD size (0.33 > 1e-4)."""
    eps = DDPOConfig().clip_range
    assert DDPOConfig().log_ratio == "mean"
    for d in (2, 16384):
        old = torch.zeros(8, dtype=torch.float64)
        new = old + 2e-5 * d
        assert bool(((step_log_ratio(new, old, d, "mean").exp() - 1).abs() <= eps).all())
    assert bool(((step_log_ratio(new, old, 16384, "sum").exp() - 1).abs() > eps).all())


def test_bad_log_ratio_names_the_choices():
    with pytest.raises(ConfigError, match="log_ratio='avg'.*mean"):
        check_log_ratio("avg")
    with pytest.raises(ConfigError, match="log_ratio"):
        DDPOConfig(log_ratio="avg").validate()
