"""DDPO: the PPO-clip loss by hand, per-condition advantage normalization, and a reward gain on a small task."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.common import condition_keys, transition_batch
from sqdf.methods.ddpo import DDPOConfig, PerConditionStatTracker, ppo_clip_loss


def test_ppo_clip_loss_hand_computed():
    log_ratio = torch.tensor([math.log(1.5), math.log(0.5), 0.0])
    adv = torch.tensor([1.0, -2.0, 3.0])
    # ratio 1.5, A 1: max(-1.5, -1.2) = -1.2; ratio 0.5, A -2: max(1.0, 1.6) = 1.6; ratio 1, A 3: -3
    assert float(ppo_clip_loss(log_ratio, adv, 0.2)) == pytest.approx((-1.2 + 1.6 - 3.0) / 3)


def test_ppo_clip_loss_gradient_vanishes_only_when_clipped():
    log_ratio = torch.tensor([math.log(1.5), math.log(1.05)], requires_grad=True)
    ppo_clip_loss(log_ratio, torch.tensor([1.0, 1.0]), 0.2).backward()
    # clipped pair: no gradient; inside the range: d/dlr of -exp(lr)/2 = -1.05/2
    assert log_ratio.grad.tolist() == pytest.approx([0.0, -1.05 / 2])


def test_stat_tracker_uses_batch_statistics_until_min_count_then_the_window():
    tracker = PerConditionStatTracker(buffer_size=4, min_count=3)
    r = torch.tensor([1.0, 3.0])
    adv = tracker.advantages(r, condition_keys(None, 2))
    assert adv.tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)  # batch mean 2, std 1 (window has only 2)
    adv = tracker.advantages(torch.tensor([5.0, 7.0]), [None, None])
    w = torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    assert adv.tolist() == pytest.approx(((torch.tensor([5.0, 7.0]) - w.mean()) / w.std(unbiased=False)).tolist(),
                                         abs=1e-5)


def test_stat_tracker_is_per_condition_and_round_trips():
    tracker = PerConditionStatTracker(buffer_size=8, min_count=2)
    cond = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    adv = tracker.advantages(torch.tensor([1.0, 3.0, 10.0, 30.0]), condition_keys(cond, 4))
    assert adv.tolist() == pytest.approx([-1.0, 1.0, -1.0, 1.0], abs=1e-5)
    other = PerConditionStatTracker(8, 2)
    other.load_state_dict(tracker.state_dict())
    assert other.history == tracker.history


def test_transition_batch_flattens_chains_in_order():
    states = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)  # 2 chains, T = 3
    x, x_next, k = transition_batch(states, torch.tensor([1]))
    assert x.flatten().tolist() == [4.0, 5.0, 6.0]
    assert x_next.flatten().tolist() == [5.0, 6.0, 7.0]
    assert k.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs", [{"clip_range": 0}, {"num_inner_epochs": 0}, {"num_minibatches": 100},
                                    {"kl_coef": -1}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DDPOConfig(batch_size=16, **kwargs).validate()


def test_ddpo_improves_reward(train_on_gaussian):
    base, final = train_on_gaussian("ddpo", steps=25, **{"method.lr": 3e-3, "method.clip_range": 0.1,
                                                                   "method.batch_size": 32})
    assert final["reward_mean"] > base["reward_mean"] + 0.3


def test_transition_chunks_give_the_same_update(tmp_path):
    """Chunked forward/backward passes inside one gradient step (ctx.backward, then optimizer_step) update the
    policy exactly as one pass over all B x T transitions."""
    from sqdf.training.run_setup import default_config
    from sqdf.training.trainer import Trainer

    def params_after(chunk: int):
        cfg = default_config("ddpo", "gaussian")
        cfg.update({"trainer": {"device": "cpu", "progress": False, "tensorboard": False, "plots": False,
                                "steps": 1, "eval_samples": 16, "floor": False},
                    "task": {"num_inference_steps": 6},
                    "method": {"batch_size": 8, "transition_chunk": chunk, "num_inner_epochs": 1, "lr": 1e-2}})
        trainer = Trainer("gaussian", "ddpo", cfg, str(tmp_path / f"c{chunk}"))
        start = torch.cat([p.detach().flatten().clone() for p in trainer.policy.trainable_parameters()])
        trainer.train()
        return start, torch.cat([p.detach().flatten() for p in trainer.policy.trainable_parameters()])

    start, whole = params_after(0)
    _, chunked = params_after(7)  # 48 transitions in chunks of 7 (the last one shorter)
    assert not torch.equal(start, whole)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
