"""DRO: the loss by hand, and a Gaussian-task run that moves toward p* with pointwise scores only."""

from __future__ import annotations

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.dro import DROConfig, dro_loss


def test_dro_loss_hand_computed_and_its_gradient():
    r = torch.tensor([1.0, -1.0])
    v = torch.tensor([0.5, 0.0], requires_grad=True)
    h = torch.tensor([0.2, -0.4], requires_grad=True)
    loss = dro_loss(r, v, h, beta=2.0)
    # residuals r - v - 2h: 1 - 0.5 - 0.4 = 0.1, -1 - 0 + 0.8 = -0.2
    assert float(loss) == pytest.approx(0.5 * (0.1**2 + 0.2**2) / 2)
    loss.backward()
    torch.testing.assert_close(h.grad, torch.tensor([-2 * 0.1 / 2, 2 * 0.2 / 2]))
    torch.testing.assert_close(v.grad, torch.tensor([-0.1 / 2, 0.2 / 2]))


@pytest.mark.parametrize("kwargs", [{"beta": 0.0}, {"log_ratio": "x"}, {"inner_steps": 0}, {"value_lr": 0.0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DROConfig(**kwargs).validate()


def test_dro_improves_reward_without_pairs(train_on_gaussian):
    base, final = train_on_gaussian("dro", steps=25, **{"method.lr": 3e-3, "method.batch_size": 32})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
    assert final["path_kl"] < 5.0


def test_offline_dro_on_scored_base_samples_raises_the_reward(tmp_path, train_on_gaussian):
    """Scores of the Gaussian task's base samples (no pairs, no chains): the error-difference implicit reward
    regressed on them raises the reward without a single reward query."""
    from sqdf.preferences.data import write_scores
    from sqdf.training.preference_pairs import reference_scores

    path = write_scores(reference_scores("gaussian", 512, settings={"task.num_inference_steps": 10}),
                        str(tmp_path / "scores.parquet"))
    base, final = train_on_gaussian("dro", steps=40, **{"method.data": path, "method.lr": 3e-3,
                                                        "method.offline_beta": 50.0, "method.samples_per_step": 256})
    assert final["reward_queries"] == 0
    assert final["reward_mean"] > base["reward_mean"] + 0.2


def test_offline_dro_loss_hand_computed(tmp_path):
    """One offline step's loss equals 1/2 (r - V(c) + beta/2 (err_theta - err_ref))^2 at theta = ref (0 gap)."""
    from sqdf.methods.dro import DRO
    from sqdf.preferences.data import PointwiseScores, write_scores
    from sqdf.training.run_setup import build_policy, default_config, make_task

    config = default_config("dro", "gaussian")
    config.set("task.num_inference_steps", 4, raw=False)
    task = make_task("gaussian", config.task)
    policy = build_policy(task, config, None, "cpu")
    path = write_scores(PointwiseScores(torch.zeros(3, 2), torch.tensor([1.0, 2.0, 3.0])),
                        str(tmp_path / "s.jsonl"))
    config.set("method.data", path, raw=False)
    method = DRO(config.method, policy, task.alpha)
    seen = {}

    def step(loss):
        seen["loss"] = float(loss)
        return {"grad_norm": 0.0}

    from sqdf.methods.base import IterationContext

    ctx = IterationContext(0, torch.Generator().manual_seed(0), None, None, step)
    stats = method.train_iteration(ctx)
    v = stats["value_mean"]  # the value of the (absent) condition, one scalar; theta = ref: no error gap
    r = torch.tensor([1.0, 2.0, 3.0])
    idx = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(0))
    assert seen["loss"] == pytest.approx(float(0.5 * ((r[idx] - v) ** 2).mean()), rel=1e-5)
