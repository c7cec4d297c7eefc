"""The digits task through the shared Trainer, the CLI and the public reload path."""

import dataclasses
import json
import os

import pytest
import torch

from sqdf.diffusion.estimators import make_estimator
from sqdf.errors import ConfigError
from sqdf.tasks import default_task_config
from sqdf.training.run_setup import default_config, make_task
from sqdf.training.trainer import Trainer

SMALL = {"optimum_samples": 64, "num_inference_steps": 8}


def small_task(**overrides):
    cfg = dataclasses.replace(default_task_config("digits"), **{**SMALL, **overrides})
    return make_task("digits", cfg)


def test_defaults_reward_and_conditions(one_thread):
    task = small_task()
    assert task.sample_shape == (1, 8, 8) and task.alpha == 1.0 and task.differentiable_reward
    assert task.sample_conditions(4) is None
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    r = task.reward(x)
    assert r.shape == (4,) and bool((r <= 0).all())  # a log-probability
    cond = small_task(digit_condition="1,7", target_digit=None).sample_conditions(100, torch.Generator())
    assert set(cond.tolist()) == {1, 7}


def test_bad_options_name_the_value():
    with pytest.raises(ConfigError, match="task.reward='aesthetic'"):
        small_task(reward="aesthetic")
    with pytest.raises(ConfigError, match="digit_condition='1,x'"):
        small_task(digit_condition="1,x")
    with pytest.raises(ConfigError, match="target_digit=None"):
        small_task(target_digit=None)
    with pytest.raises(ConfigError, match="schedule"):
        small_task(schedule="linear")
    cfg = default_config("sqdf-paper", "digits")
    cfg.update({"task": {**SMALL, "reward": "png"}})
    with pytest.raises(ConfigError, match="black-box"):
        Trainer("digits", "sqdf-paper", cfg, "/tmp/unused")
    cfg = default_config("sqdf", "digits")  # a learned soft value needs no reward gradient
    cfg.update({"task": {**SMALL, "reward": "png"}})
    Trainer("digits", "sqdf", cfg, "/tmp/unused")


def test_known_optimum_is_bounded_by_jensen_and_the_best_reward(one_thread):
    task = small_task()
    _, _, r = task._base_samples()
    opt = task.known_optimum()
    assert float(r.mean()) <= opt.optimum <= float(r.max())
    assert opt.optimum_stderr > 0 and opt.kl >= 0
    kept, _ = task.target_samples(torch.Generator().manual_seed(0))
    # the exact target (rejection sampling on exp(r - max r)) favours the target digit
    with torch.no_grad():
        frac_kept = (task._features(kept).argmax(1) == 3).float().mean()
        frac_base = (task._features(task._base_samples()[0]).argmax(1) == 3).float().mean()
    assert float(frac_kept) >= float(frac_base)


def test_consistency_estimator_uses_the_attached_model(one_thread):
    task = small_task()
    cfg = default_config("sqdf-paper", "digits")
    cfg.update({"task": SMALL, "trainer": {"eval_samples": 16, "plots": False}})
    trainer = Trainer("digits", "sqdf-paper", cfg, "/tmp/unused")
    policy = trainer.policy
    x = torch.randn(3, 1, 8, 8)
    est = make_estimator("consistency")
    out = est(policy, x, 2, None)
    t = torch.full((3,), policy.schedule.timesteps[2])
    with torch.no_grad():
        assert torch.allclose(out, policy.consistency_model(x, t, None))
    assert torch.equal(est(policy, x, policy.num_steps, None), x)  # the final state is its own estimate
    policy.__dict__["consistency_model"] = None
    with pytest.raises(ConfigError, match="consistency model"):
        est(policy, x, 2, None)
    del task


@pytest.mark.parametrize("estimator", ["consistency", "tweedie"])
def test_sqdf_trains_on_digits_and_the_weights_reload(tmp_path, one_thread, estimator):
    from sqdf.cli import main
    from sqdf.digits.store import load_model

    cfg = default_config("sqdf", "digits")
    cfg.update({"task": SMALL, "method": {"batch_size": 8, "estimator": estimator, "critic_warmup": 0,
                                          "train_batch_size": 8, "critic_batch_size": 16},
                "trainer": {"steps": 3, "eval_every": 0, "eval_samples": 32, "checkpoint_every": 1,
                            "tensorboard": False, "progress": False}})
    out = str(tmp_path / "run")
    summary = Trainer("digits", "sqdf", cfg, out).train()
    for key in ("reward_mean", "path_kl", "objective", "optimum", "regret", "frechet", "diversity",
                "target_accuracy", "optimal_frechet", "optimal_diversity"):
        assert summary[key] is not None, key
    assert summary["path_kl"] > 0  # the policy moved
    for name in ("samples_000000_base.png", "samples_000003.png", "curves.png"):
        assert os.path.exists(os.path.join(out, "plots", name))
    unet, meta = load_model(os.path.join(out, "model.safetensors"), "unet")
    trainer = Trainer.resume(out)
    for a, b in zip(unet.state_dict().values(), trainer.policy.model.model.state_dict().values()):
        assert torch.equal(a, b)
    # sqdf sample: a grid and the samples, from the run directory
    png = str(tmp_path / "grid.png")
    assert main(["sample", out, "--n", "16", "--out", png]) == 0
    assert os.path.getsize(png) > 0 and os.path.exists(str(tmp_path / "grid.safetensors"))
    assert json.load(open(os.path.join(out, "summary.json")))["iterations"] == 3


def test_black_box_reward_with_a_gradient_free_method(tmp_path, one_thread):
    cfg = default_config("ddpo", "digits")
    cfg.update({"task": {**SMALL, "reward": "png"}, "method": {"batch_size": 8},
                "trainer": {"steps": 2, "eval_every": 0, "eval_samples": 16, "tensorboard": False,
                            "progress": False, "plots": False}})
    summary = Trainer("digits", "ddpo", cfg, str(tmp_path / "run")).train()
    assert summary["reward_mean"] < 0 and "target_accuracy" not in summary


def test_sample_cli_errors(tmp_path, capsys):
    from sqdf.cli import main

    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_consistency_model_refuses_another_guidance_scale():
    task = small_task(digit_condition="all", target_digit=None, guidance_scale=2.0)
    with pytest.raises(ConfigError, match="guidance scale 1.0"):
        task.consistency_model()
    assert small_task(digit_condition="all", target_digit=None).consistency_model() is not None


@pytest.mark.parametrize("method", ["sqdf", "prdp"])
def test_conditional_make_it_look_like_another_digit(tmp_path, one_thread, method):
    """Conditions are digit labels (long); the reward targets condition + 1; the summary has class accuracy."""
    cfg = default_config(method, "digits")
    cfg.update({"task": {**SMALL, "digit_condition": "all", "target_digit": None, "digit_offset": 1},
                "method": {"batch_size": 8, **({"estimator": "tweedie"} if method == "sqdf" else {"group_size": 4})},
                "trainer": {"steps": 2, "eval_every": 0, "eval_samples": 40, "tensorboard": False,
                            "progress": False}})
    out = str(tmp_path / "run")
    summary = Trainer("digits", method, cfg, out).train()
    assert summary["class_accuracy"] > 0.5 and summary["target_accuracy"] < 0.5  # still mostly the asked class
    assert os.path.exists(os.path.join(out, "plots", "samples_000002.png"))
