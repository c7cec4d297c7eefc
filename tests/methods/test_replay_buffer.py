"""ReplayBuffer: ring order, sampling rules (random, on_policy, reward_gamma_per) and checkpoint round-trip."""

from __future__ import annotations

import pytest
import torch

from sqdf.methods.replay_buffer import ReplayBuffer, pair_probabilities

T, D = 3, 2


def _states(ids, num_steps=T):
    """Chains whose every entry holds the chain's id, [B, T+1, D]."""
    ids = torch.as_tensor(ids, dtype=torch.float32)
    return ids[:, None, None].expand(-1, num_steps + 1, D).clone()


def _filled(capacity, ids, rewards=None):
    buf = ReplayBuffer(capacity, T)
    ids = list(ids)
    r = torch.as_tensor(rewards if rewards is not None else [float(i) for i in ids], dtype=torch.float32)
    buf.add(_states(ids), r)
    return buf


def test_ring_overwrite_order_and_len():
    buf = ReplayBuffer(5, T)
    assert len(buf) == 0
    buf.add(_states([0, 1, 2]), torch.tensor([0.0, 1.0, 2.0]))
    assert len(buf) == 3
    buf.add(_states([3, 4, 5]), torch.tensor([3.0, 4.0, 5.0]))
    assert len(buf) == 5
    # slot 0 was overwritten by entry 5; slots 1..4 hold entries 1..4
    torch.testing.assert_close(buf.states[:, 0, 0], torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(buf.rewards, torch.tensor([5.0, 1.0, 2.0, 3.0, 4.0]))
    assert buf.order.tolist() == [5, 1, 2, 3, 4]
    buf.add(_states([6, 7, 8, 9, 10]), torch.arange(6, 11).float())  # a whole capacity at once
    assert len(buf) == 5
    torch.testing.assert_close(buf.states[:, 0, 0], torch.tensor([10.0, 6.0, 7.0, 8.0, 9.0]))
    assert buf.inserted == 11
    # every slot's states agree with its reward and its insertion number
    torch.testing.assert_close(buf.states[:, 0, 0], buf.rewards)
    torch.testing.assert_close(buf.order.float(), buf.rewards)


def test_add_rejects_wrong_chain_length_and_stores_conds():
    buf = ReplayBuffer(4, T)
    with pytest.raises(ValueError):
        buf.add(_states([0, 1], num_steps=T + 1), torch.zeros(2))
    conds = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    buf.add(_states([0, 1]), torch.zeros(2), conds)
    torch.testing.assert_close(buf.conds[:2], conds)


def test_empty_buffer_and_bad_mode_raise():
    buf = ReplayBuffer(4, T)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError):
        buf.sample_pairs(2, "random", g)
    buf.add(_states([0]), torch.ones(1))
    with pytest.raises(ValueError):
        buf.sample_pairs(2, "fifo", g)


def test_on_policy_draws_only_newest_entries():
    buf = _filled(5, range(5))
    buf.add(_states([5, 6, 7]), torch.tensor([5.0, 6.0, 7.0]))  # wraps around: slots 0, 1, 2
    g = torch.Generator().manual_seed(0)
    seen = set()
    steps = set()
    for _ in range(50):
        idx, k = buf.sample_pairs(2, "on_policy", g)
        assert idx.shape == (2,) and k.shape == (2,)
        seen.update(buf.states[idx, 0, 0].tolist())
        steps.update(k.tolist())
    assert seen == {6.0, 7.0}
    assert steps == set(range(T))
    # batch 3: the newest three, found by insertion order even though they sit in slots 0..2 after a wrap
    for _ in range(50):
        idx, _ = buf.sample_pairs(3, "on_policy", g)
        assert set(buf.states[idx, 0, 0].tolist()) <= {5.0, 6.0, 7.0}


def test_on_policy_batch_larger_than_buffer_uses_all():
    buf = _filled(8, range(3))
    idx, _ = buf.sample_pairs(200, "on_policy", torch.Generator().manual_seed(1))
    assert set(idx.tolist()) == {0, 1, 2}


def test_random_mode_covers_all_entries_and_steps():
    buf = _filled(6, range(6))
    g = torch.Generator().manual_seed(0)
    idx, k = buf.sample_pairs(3000, "random", g)
    assert set(idx.tolist()) == set(range(6))
    assert set(k.tolist()) == set(range(T))
    counts = torch.bincount(idx * T + k, minlength=6 * T).double()
    expected = 3000 / (6 * T)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 17 degrees of freedom
    # a partly filled buffer never draws empty slots
    part = _filled(10, range(4))
    idx, _ = part.sample_pairs(500, "random", g)
    assert int(idx.max()) <= 3


def test_pair_probabilities_closed_form():
    rewards = torch.tensor([1.0, -0.5, 2.0, 0.5, 0.0])
    gamma = 0.8
    probs = pair_probabilities(rewards, T, gamma)
    # hand-built weights max(r, 0) * gamma^(T-1-k)
    disc = [gamma**2, gamma, 1.0]
    w = torch.tensor([[max(r, 0.0) * d for d in disc] for r in rewards.tolist()], dtype=torch.float64)
    torch.testing.assert_close(probs, w / w.sum())
    assert float(probs.sum()) == pytest.approx(1.0)


def test_reward_gamma_per_frequencies_match_probabilities():
    rewards = [1.0, -0.5, 2.0, 0.5, 0.0]
    gamma = 0.8
    buf = _filled(5, range(5), rewards=rewards)
    g = torch.Generator().manual_seed(123)
    n = 100_000
    idx, k = buf.sample_pairs(n, "reward_gamma_per", g, gamma=gamma)
    disc = [gamma**2, gamma, 1.0]
    w = torch.tensor([[max(r, 0.0) * d for d in disc] for r in rewards], dtype=torch.float64)
    p = (w / w.sum()).flatten()
    counts = torch.bincount(idx * T + k, minlength=5 * T).double()
    # zero-probability pairs (non-positive rewards) are never drawn
    assert float(counts[p == 0].sum()) == 0
    pos = p > 0
    expected = n * p[pos]
    chi2 = float(((counts[pos] - expected) ** 2 / expected).sum())
    assert chi2 < 40  # 8 degrees of freedom; p-value ~ 3e-6
    # the last step is favored over the first by 1/gamma^2 for the same chain
    assert counts[2 * T + 2] > counts[2 * T + 0]


def test_reward_gamma_per_uniform_fallback_when_all_rewards_nonpositive():
    rewards = torch.tensor([-1.0, 0.0, -3.0, -0.1])
    probs = pair_probabilities(rewards, T, 0.9)
    torch.testing.assert_close(probs, torch.full((4, T), 1.0 / (4 * T), dtype=torch.float64))
    buf = _filled(4, range(4), rewards=rewards.tolist())
    idx, k = buf.sample_pairs(4000, "reward_gamma_per", torch.Generator().manual_seed(0), gamma=0.9)
    counts = torch.bincount(idx * T + k, minlength=4 * T).double()
    assert bool((counts > 0).all())
    expected = 4000 / (4 * T)
    assert float(((counts - expected) ** 2 / expected).sum()) < 40


def test_state_dict_round_trip():
    buf = ReplayBuffer(4, T)
    buf.add(_states([0, 1, 2]), torch.tensor([0.5, 1.5, 2.5]), torch.tensor([[0.0], [1.0], [2.0]]))
    buf.add(_states([3, 4]), torch.tensor([3.5, 4.5]), torch.tensor([[3.0], [4.0]]))
    state = buf.state_dict()
    other = ReplayBuffer(4, T)
    other.load_state_dict(state)
    assert len(other) == len(buf) == 4
    assert other.inserted == buf.inserted
    torch.testing.assert_close(other.states, buf.states)
    torch.testing.assert_close(other.conds, buf.conds)
    torch.testing.assert_close(other.rewards, buf.rewards)
    assert other.order.tolist() == buf.order.tolist()
    # identical draws from identical generators
    for mode in ("random", "on_policy", "reward_gamma_per"):
        a = buf.sample_pairs(16, mode, torch.Generator().manual_seed(7), gamma=0.9)
        b = other.sample_pairs(16, mode, torch.Generator().manual_seed(7), gamma=0.9)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the next insert goes to the same slot in both
    buf.add(_states([9]), torch.tensor([9.0]), torch.tensor([[9.0]]))
    other.add(_states([9]), torch.tensor([9.0]), torch.tensor([[9.0]]))
    torch.testing.assert_close(other.states, buf.states)
    with pytest.raises(ValueError):
        ReplayBuffer(5, T).load_state_dict(state)
    with pytest.raises(ValueError):
        ReplayBuffer(4, T + 1).load_state_dict(state)


def test_state_dict_of_empty_buffer():
    other = ReplayBuffer(3, T)
    other.load_state_dict(ReplayBuffer(3, T).state_dict())
    assert len(other) == 0 and other.states is None
