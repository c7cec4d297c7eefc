"""trainer.reward_model: training rollouts are scored by the learned reward, evaluations by the true one; the
pessimistic reward; PrefPaint's trust weights reach DDPO's loss, and methods that would ignore them are refused."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods.base import IterationContext, Rollout
from sqdf.methods.ddpo import DDPO, ppo_clip_loss
from sqdf.models.features import RawFeatures
from sqdf.preferences import PreferenceRewardModel
from sqdf.training.preference_pairs import reference_pairs
from sqdf.training.run_setup import default_config
from sqdf.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8  # sampler steps
QUICK = {"trainer.eval_every": 0, "trainer.eval_samples": 64, "trainer.checkpoint_every": 10_000,
         "trainer.progress": False, "trainer.tensorboard": False, "trainer.plots": False, "trainer.floor": False,
         "trainer.device": "cpu", "task.num_inference_steps": STEPS, "method.batch_size": 8}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, one_thread):
    pairs = reference_pairs("gmm1", 96, settings={"task.num_inference_steps": STEPS})
    model = PreferenceRewardModel(RawFeatures(), ensemble=2, hidden=16, epochs=30).fit(pairs)
    return model.save(str(tmp_path_factory.mktemp("rm") / "rm.safetensors"))


def _trainer(tmp_path, method="ddpo", **settings) -> Trainer:
    config = default_config(method, "gmm1")
    for key, value in {**QUICK, **settings}.items():
        config.set(key, value, raw=False)
    return Trainer("gmm1", method, config, str(tmp_path / "run"))


def test_training_uses_the_learned_reward_and_evaluation_the_true_one(tmp_path, model_path):
    trainer = _trainer(tmp_path, **{"trainer.reward_model": model_path, "trainer.steps": 2})
    model = trainer.learned_reward.model
    roll = trainer._rollout(8)
    x = roll.trajectory.samples
    assert roll.weights is None
    torch.testing.assert_close(roll.rewards, model(x))
    assert not torch.allclose(roll.rewards, trainer.task.reward(x))
    metrics, samples = trainer.evaluate(64)
    assert metrics["reward_mean"] == pytest.approx(float(trainer.task.reward(samples).mean()), rel=1e-5)
    assert metrics["learned_reward"] == pytest.approx(float(model(samples).mean()), rel=1e-5, abs=1e-6)
    assert metrics["learned_reward_std"] == pytest.approx(float(model.std(samples).mean()), rel=1e-5)
    summary = trainer.train()
    assert summary["iterations"] == 2 and summary["reward_queries"] == 8 + 2 * 8  # learned-reward queries
    assert "learned_reward" in summary and math.isfinite(summary["regret"])


def test_pessimism_trains_on_mean_minus_kappa_std(tmp_path, model_path):
    trainer = _trainer(tmp_path, **{"trainer.reward_model": model_path, "trainer.reward_model_pessimism": 1.0})
    roll = trainer._rollout(8)
    model, x = trainer.learned_reward.model, roll.trajectory.samples
    torch.testing.assert_close(roll.rewards, model(x) - model.std(x))


def test_trust_weights_reach_the_rollout_and_the_log(tmp_path, model_path):
    import json

    trainer = _trainer(tmp_path, **{"trainer.reward_model": model_path, "trainer.reward_model_trust": True,
                                    "trainer.steps": 1})
    roll = trainer._rollout(8)
    torch.testing.assert_close(roll.weights, trainer.learned_reward.model.trust_weight(roll.trajectory.samples))
    assert ((roll.weights >= 1) & (roll.weights <= 2.21)).all()
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert 1 <= next(r for r in rows if r["kind"] == "train")["trust_weight"] <= 2.21


def test_trust_with_a_method_that_ignores_weights_is_refused(tmp_path, model_path):
    with pytest.raises(ConfigError, match="dpok ignores sample weights.*ddpo"):
        _trainer(tmp_path, "dpok", **{"trainer.reward_model": model_path, "trainer.reward_model_trust": True})
    with pytest.raises(ConfigError, match="set trainer.reward_model=MODEL.safetensors"):
        _trainer(tmp_path, **{"trainer.reward_model_trust": True})
    with pytest.raises(ConfigError, match="reward_model_pessimism=-1.0 must be >= 0"):
        _trainer(tmp_path, **{"trainer.reward_model": model_path, "trainer.reward_model_pessimism": -1.0})
    with pytest.raises(ConfigError, match="does not exist.*sqdf reward-model"):
        _trainer(tmp_path, **{"trainer.reward_model": str(tmp_path / "missing.safetensors")})


def test_weights_multiply_the_clipped_terms_by_hand():
    log_ratio = torch.tensor([math.log(1.5), math.log(0.5), 0.0])
    adv = torch.tensor([1.0, -2.0, 3.0])
    w = torch.tensor([2.0, 1.0, 0.5])
    # terms -1.2, 1.6, -3 (test_ddpo.py); weighted and still divided by N = 3
    assert float(ppo_clip_loss(log_ratio, adv, 0.2, w)) == pytest.approx((-2.4 + 1.6 - 1.5) / 3)
    assert float(ppo_clip_loss(log_ratio, adv, 0.2, torch.ones(3))) == float(ppo_clip_loss(log_ratio, adv, 0.2))


def test_ddpo_loss_scales_with_the_rollout_weights(tmp_path):
    trainer = _trainer(tmp_path, **{"method.num_inner_epochs": 1})
    roll = trainer._rollout(8)

    def step_loss(weights):
        losses = []

        def optimizer_step(loss):
            losses.append(float(loss.detach()))
            return {"grad_norm": 0.0}

        method = DDPO(trainer.config.method, trainer.policy, trainer.task.alpha)
        ctx = IterationContext(0, torch.Generator().manual_seed(0), lambda n, cond=None: Rollout(
            roll.trajectory, roll.rewards, weights), trainer.reward, optimizer_step)
        method.train_iteration(ctx)
        return losses[0]

    plain = step_loss(None)
    assert step_loss(torch.full((8,), 2.0)) == pytest.approx(2 * plain, rel=1e-12)
    assert step_loss(torch.ones(8)) == pytest.approx(plain, rel=1e-12)
    first = torch.tensor([1.0] * 4 + [0.0] * 4)  # only the first four chains count, then only the others
    assert step_loss(first) + step_loss(1 - first) == pytest.approx(plain, rel=1e-9)
    assert step_loss(first) != pytest.approx(plain)


def test_fit_reward_model_takes_loaded_pairs_and_logs_one_line(tmp_path):
    from sqdf.training.learned_reward import fit_reward_model

    pairs = reference_pairs("gmm1", 40, settings={"task.num_inference_steps": STEPS})
    lines = []
    out = str(tmp_path / "rm.safetensors")
    result = fit_reward_model("gmm1", pairs, out, ensemble=2, hidden=8, epochs=10, seed=1, log=lines.append)
    assert result["pairs"] == 36 and result["heldout_pairs"] == 4 and len(lines) == 1 and out in lines[0]
    assert PreferenceRewardModel.load(out, RawFeatures(), (2,)).info["pairs_file"] == "the given pairs"
    with pytest.raises(ConfigError, match=r"shape \(3,\) for task gmm1"):
        fit_reward_model("gmm1", type(pairs)(torch.zeros(4, 3), torch.ones(4, 3), torch.ones(4)), out)
