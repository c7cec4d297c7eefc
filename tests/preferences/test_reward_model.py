"""Bradley-Terry reward models: the loss by hand, recovering a known linear reward, the temperature as the scale,
exact save/load, clear load errors, PrefPaint's trust weight by hand, and a deterministic ensemble spread."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from sqdf.errors import ConfigError
from sqdf.models.features import ModuleFeatures, RawFeatures
from sqdf.preferences import PreferencePairs, PreferenceRewardModel, bradley_terry_labels, bradley_terry_loss

pytestmark = pytest.mark.usefixtures("one_thread")

W = torch.tensor([1.0, -2.0])
FAST = dict(ensemble=3, hidden=32, epochs=150, lr=1e-2)


def linear_pairs(n: int, seed: int, temperature: float = 1.0) -> PreferencePairs:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    return PreferencePairs(a, b, bradley_terry_labels(a @ W, b @ W, temperature, g))


@pytest.fixture(scope="module")
def fitted(one_thread):
    return PreferenceRewardModel(RawFeatures(), seed=0, **FAST).fit(linear_pairs(384, seed=0))


def test_bradley_terry_loss_hand_computed_with_ties_as_soft_targets():
    m = torch.tensor([0.0, 2.0, -1.0, 1.0, 0.0], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5])
    loss = bradley_terry_loss(m, y)
    tie = 0.5 * math.log(1 + math.exp(-1)) + 0.5 * math.log(1 + math.exp(1))
    expected = [math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1)), tie, math.log(2)]
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.sum().backward()
    # d/dm = sigmoid(m) - y: a tie pulls its margin to 0 and is at rest there
    torch.testing.assert_close(m.grad, torch.sigmoid(m.detach()) - y)
    assert float(m.grad[4]) == 0.0 and float(m.grad[3]) > 0


def test_the_label_temperature_is_the_reward_scale():
    pairs = linear_pairs(64, seed=3)
    opts = dict(ensemble=2, hidden=8, epochs=20)
    one = PreferenceRewardModel(RawFeatures(), temperature=1.0, **opts).fit(pairs)
    two = PreferenceRewardModel(RawFeatures(), temperature=2.0, **opts).fit(pairs)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(two(x), 2 * one(x))  # the same logits, read in units twice as large
    torch.testing.assert_close(two.std(x), 2 * one.std(x))


def test_fit_recovers_a_linear_reward_up_to_a_constant(fitted):
    held = linear_pairs(2000, seed=1)
    bayes = float(((held.a @ W > held.b @ W) == (held.labels == 1)).float().mean())  # the true reward's own accuracy
    assert fitted.accuracy(held) > bayes - 0.04
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(2)) * 0.8
    r, true = fitted(x), x @ W
    assert torch.corrcoef(torch.stack([r, true]))[0, 1] > 0.98
    # reward differences come back in the labeller's units (same temperature), the constant is arbitrary
    slope = float(((r - r.mean()) * (true - true.mean())).sum() / ((true - true.mean()) ** 2).sum())
    assert 0.75 < slope < 1.25
    train = torch.cat([linear_pairs(384, seed=0).a, linear_pairs(384, seed=0).b])
    assert abs(float(fitted(train).mean())) < 1e-4  # centered on its training samples


def test_gradients_reach_x_and_never_the_parameters(fitted):
    assert all(not p.requires_grad for p in fitted.parameters())
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(10)).requires_grad_(True)
    fitted(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in fitted.parameters())


def test_ensemble_std_grows_away_from_the_data_and_is_deterministic_per_seed(fitted):
    near = torch.randn(256, 2, generator=torch.Generator().manual_seed(4)) * 0.5
    far = near / near.norm(dim=1, keepdim=True) * 8
    assert (fitted.std(near) > 0).all()
    assert fitted.std(far).mean() > 2 * fitted.std(near).mean()
    pairs = linear_pairs(384, seed=0)
    again = PreferenceRewardModel(RawFeatures(), seed=0, **FAST).fit(pairs)
    torch.testing.assert_close(again(far), fitted(far), rtol=0, atol=0)
    torch.testing.assert_close(again.std(far), fitted.std(far), rtol=0, atol=0)
    other = PreferenceRewardModel(RawFeatures(), seed=1, **FAST).fit(pairs)
    assert not torch.equal(other.std(far), fitted.std(far))
    assert torch.equal(fitted.reward(far, None, 0.0), fitted(far))
    torch.testing.assert_close(fitted.reward(far, None, 1.5), fitted(far) - 1.5 * fitted.std(far))


def _hand_phi(model: PreferenceRewardModel, x: torch.Tensor) -> torch.Tensor:
    z = ((x - model.f_mean) / model.f_std).double()
    h = model.heads
    silu = torch.nn.functional.silu
    parts = [silu(silu(z @ h.w1[k].double() + h.b1[k].double()) @ h.w2[k].double() + h.b2[k].double())
             for k in range(h.members)]
    return torch.cat(parts, dim=1)  # [B, K*H]


def test_trust_weight_matches_the_hand_formula_on_a_tiny_ridge_problem():
    pairs = linear_pairs(6, seed=5)
    model = PreferenceRewardModel(RawFeatures(), ensemble=2, hidden=3, epochs=10, ridge=0.5).fit(pairs)
    train = torch.cat([pairs.a, pairs.b])
    phi_train = _hand_phi(model, train)
    v = 0.5 * torch.eye(6, dtype=torch.float64) + phi_train.T @ phi_train
    g = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(4, 2, generator=g), 30 * torch.randn(4, 2, generator=g)])
    phi = _hand_phi(model, x)
    bound = torch.sqrt((phi * torch.linalg.solve(v, phi.T).T).sum(1))
    torch.testing.assert_close(model.bound(x), bound, rtol=1e-5, atol=1e-6)  # phi in float32 there
    torch.testing.assert_close(model.trust_weight(x).double(), torch.exp(-0.05 * bound + 0.7).clamp(1, 2.21),
                               rtol=1e-5, atol=1e-6)
    w = model.trust_weight(x, a=1.0, b=0.7, lo=0.5, hi=1.5).double()
    torch.testing.assert_close(w, torch.exp(-bound + 0.7).clamp(0.5, 1.5), rtol=1e-5, atol=1e-6)
    assert (w == 0.5).any() or (w == 1.5).any()  # the clamp is exercised
    assert not model.trust_weight(x).requires_grad


def test_conditions_reach_the_feature_map():
    g = torch.Generator().manual_seed(6)
    n = 256
    a, b = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
    cond = torch.randint(0, 2, (n,), generator=g)
    sign = 1 - 2 * cond.float()  # condition 1 flips the reward
    labels = bradley_terry_labels(sign * (a @ W), sign * (b @ W), 0.3, g)
    model = PreferenceRewardModel(RawFeatures(num_classes=2), ensemble=2, hidden=32, epochs=150, lr=1e-2)
    pairs = PreferencePairs(a, b, labels, cond)
    assert model.fit(pairs).accuracy(pairs) > 0.85


def test_save_load_round_trip_is_exact(fitted, tmp_path):
    path = fitted.save(str(tmp_path / "rm.safetensors"), info={"task": "toy"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm.safetensors"]  # no temporary left behind
    back = PreferenceRewardModel.load(path, RawFeatures(), sample_shape=(2,))
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(9)) * 3
    for fn in ("forward", "std", "trust_weight", "member_rewards", "bound"):
        assert torch.equal(getattr(back, fn)(x), getattr(fitted, fn)(x)), fn
    assert back.info == {"task": "toy"} and back.sample_shape == (2,) and back.num_pairs == 384
    assert (back.ensemble, back.hidden, back.temperature) == (3, 32, 1.0)


def test_load_errors_name_the_file_and_the_fix(fitted, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match=r"nope\.safetensors.*does not exist.*sqdf reward-model"):
        PreferenceRewardModel.load(missing, RawFeatures())
    good = fitted.save(str(tmp_path / "good.safetensors"))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:200])
    with pytest.raises(ConfigError, match=r"cut\.safetensors.*not a readable safetensors.*sqdf reward-model"):
        PreferenceRewardModel.load(str(truncated), RawFeatures())
    other = str(tmp_path / "other.safetensors")
    save_file({"w": torch.zeros(2)}, other, metadata={"task": "gmm1"})
    with pytest.raises(ConfigError, match="not a reward model"):
        PreferenceRewardModel.load(other, RawFeatures())
    with pytest.raises(ConfigError, match=r"good\.safetensors.*width 2.*gives 3.*sqdf reward-model"):
        PreferenceRewardModel.load(good, RawFeatures(), sample_shape=(3,))
    with pytest.raises(ConfigError, match="fit on RawFeatures features.*ModuleFeatures"):
        PreferenceRewardModel.load(good, ModuleFeatures(lambda x, c=None: x, dim=2))
    late = PreferenceRewardModel.load(good, RawFeatures())  # width unknown until samples are seen
    with pytest.raises(ConfigError, match=r"returned 3 features but reward model .*good\.safetensors.* fit on 2"):
        late(torch.zeros(1, 3))


def test_bad_options_and_data_are_refused():
    with pytest.raises(ConfigError, match="temperature"):
        PreferenceRewardModel(RawFeatures(), temperature=0.0)
    with pytest.raises(ConfigError, match="ensemble"):
        PreferenceRewardModel(RawFeatures(), ensemble=0)
    ties = PreferencePairs(torch.zeros(4, 2), torch.ones(4, 2), torch.full((4,), 0.5))
    with pytest.raises(ConfigError, match="all 4 preference pairs are ties"):
        PreferenceRewardModel(RawFeatures()).fit(ties)
    with pytest.raises(ConfigError, match="not been fit"):
        PreferenceRewardModel(RawFeatures())(torch.zeros(1, 2))
