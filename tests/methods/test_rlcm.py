"""RLCM: the consistency schedule's coefficients, its step against the hand-written renoise step, log-probs and KLs
by hand, ratio 1 at the sampling policy, the Trainer's build hook (resume, `sqdf sample`), a reward gain on a small
toy run, and the digits policy."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from sqdf.diffusion.consistency_schedule import ConsistencySchedule
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import FlowMatchSchedule, NoiseSchedule, ScheduleConfig, gaussian_kl, gaussian_log_prob
from sqdf.errors import ConfigError
from sqdf.methods.base import IterationContext, Rollout
from sqdf.methods.ddpo import PerConditionStatTracker, ppo_clip_loss
from sqdf.methods.rlcm import RLCM, RLCMConfig

N_TRAIN, T, D, FINAL_STD = 50, 4, 2, 0.1


class TinyX0(nn.Module):
    """A consistency-style model f(x, t) = x0 = W tanh(x) (1 + t / N) + b (float64, 'sample' prediction)."""

    prediction_type = "sample"

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.3 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x, t, cond=None):
        xx = x.to(self.W.dtype)
        return ((torch.tanh(xx) @ self.W.T) * (1 + t.to(xx.dtype)[:, None] / N_TRAIN) + self.b).to(x.dtype)


def _schedule(**kw) -> ConsistencySchedule:
    return ConsistencySchedule(NoiseSchedule(ScheduleConfig(num_train_steps=N_TRAIN)), T, FINAL_STD, **kw)


def _policy(different: bool = True) -> DiffusionPolicy:
    policy = DiffusionPolicy(TinyX0(0), _schedule(), (D,), reference=TinyX0(0))
    if different:
        with torch.no_grad():
            policy.model.W.add_(0.2)
    return policy.to(torch.float64)


# ---- the schedule -----------------------------------------------------------------------------------------------


def test_schedule_coefficients():
    sch = _schedule()
    abar = sch.alphas_cumprod
    assert sch.timesteps == [49, 37, 24, 12, 0] and sch.num_steps == T
    assert float(sch.abar[-1]) == 1.0 and float(sch.noise[-1]) == 0.0  # t_T = 0 is the clean sample
    torch.testing.assert_close(sch.abar[:-1], abar[[49, 37, 24, 12]])
    torch.testing.assert_close(sch.signal, sch.abar.sqrt())
    torch.testing.assert_close(sch.sigmas[:-1], (1 - abar[[37, 24, 12]]).sqrt())  # renoise to the next level
    assert float(sch.sigmas[-1]) == FINAL_STD
    assert isinstance(sch, NoiseSchedule) and sch.clip_sample is None and sch.eta is None
    custom = _schedule(timesteps=[40, 10, 0])
    assert custom.timesteps == [40, 10, 0] and custom.num_steps == 2


@pytest.mark.parametrize("kwargs, match", [({"final_std": 0.0}, "final_std"), ({"timesteps": [40, 10, 1]}, "end at 0"),
                                           ({"timesteps": [10, 40, 0]}, "decreasing")])
def test_schedule_errors_name_the_value(kwargs, match):
    base = NoiseSchedule(ScheduleConfig(num_train_steps=N_TRAIN))
    args = {"num_steps": T, "final_std": FINAL_STD, **kwargs}
    with pytest.raises(ConfigError, match=match):
        ConsistencySchedule(base, **args)


def test_schedule_refuses_a_flow_schedule():
    with pytest.raises(ConfigError, match="VP"):
        ConsistencySchedule(FlowMatchSchedule(4), 4)


# ---- the step, log-probs and KLs -------------------------------------------------------------------------------


def test_policy_step_is_the_renoise_step_and_sample_is_the_hand_written_chain():
    policy = _policy()
    abar = policy.schedule.alphas_cumprod
    ts = policy.schedule.timesteps
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    for k in range(T):
        f = policy.model(x, torch.full((5,), ts[k]))
        a_next = abar[ts[k + 1]] if k < T - 1 else torch.tensor(1.0, dtype=torch.float64)
        mean, std = policy.step_distribution(x, k)
        torch.testing.assert_close(mean, a_next.sqrt() * f, rtol=1e-12, atol=1e-12)
        expected_std = (1 - a_next).sqrt() if k < T - 1 else torch.tensor(FINAL_STD, dtype=torch.float64)
        torch.testing.assert_close(std.flatten(), expected_std.expand(5).to(std.dtype))

    traj = policy.sample(7, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)  # the chain by hand, with the same draws
    x = torch.randn(7, D, generator=g, dtype=torch.float64)
    for k in range(T):
        x0 = policy.model(x, torch.full((7,), ts[k]))
        z = torch.randn(7, D, generator=g, dtype=torch.float64)
        if k < T - 1:
            x = abar[ts[k + 1]].sqrt() * x0 + (1 - abar[ts[k + 1]]).sqrt() * z
        else:
            x = x0 + FINAL_STD * z
        torch.testing.assert_close(traj.states[:, k + 1], x, rtol=1e-12, atol=1e-12)


def test_log_probs_and_kls_by_hand():
    policy = _policy()
    traj = policy.sample(6, generator=torch.Generator().manual_seed(5))
    abar, ts = policy.schedule.alphas_cumprod, policy.schedule.timesteps
    for k in range(T):
        x, x_next = traj.states[:, k], traj.states[:, k + 1]
        t = torch.full((6,), ts[k])
        signal = abar[ts[k + 1]].sqrt() if k < T - 1 else 1.0
        std = (1 - abar[ts[k + 1]]).sqrt() if k < T - 1 else FINAL_STD
        mean, ref_mean = signal * policy.model(x, t), signal * policy.reference(x, t)
        logp = (-((x_next - mean) ** 2).sum(1) / (2 * std**2) - D * math.log(std) - D / 2 * math.log(2 * math.pi))
        torch.testing.assert_close(traj.log_probs[:, k], logp)
        torch.testing.assert_close(traj.ref_log_probs[:, k], gaussian_log_prob(x_next, ref_mean, std))
        torch.testing.assert_close(traj.kls[:, k], ((mean - ref_mean) ** 2).sum(1) / (2 * std**2))
    assert bool((traj.kls[:, -1] > 0).all())
    torch.testing.assert_close(traj.path_kl, traj.kls.sum(1))
    fresh = _policy(different=False).sample(4, generator=torch.Generator().manual_seed(0))
    assert float(fresh.path_kl.abs().max()) == 0.0  # the copy starts at the reference
    torch.testing.assert_close(gaussian_kl(mean, std, ref_mean, std), traj.kls[:, -1])


# ---- the method at the sampling policy ---------------------------------------------------------------------------


def _ctx(policy, it, generator, seen):
    def rollout(n, cond=None):
        traj = policy.sample(n, cond, generator)
        rewards = -((traj.samples - 1.0) ** 2).sum(1)
        seen["rewards"].append(rewards)
        return Rollout(traj, rewards)

    def step(loss):  # no update: every minibatch is scored at the sampling policy
        seen["losses"].append(float(loss.detach()))
        loss.backward()
        return {"grad_norm": 0.0}

    return IterationContext(it, generator, rollout, lambda x, c=None: None, step)


def test_ratio_one_and_loss_equals_minus_mean_advantage_at_the_sampling_policy():
    policy = _policy()
    cfg = RLCMConfig(batch_size=8, num_minibatches=2, num_inner_epochs=1, stat_buffer_size=32, stat_min_count=8,
                     sampler_steps=T, final_std=FINAL_STD)
    method = RLCM(cfg, policy, alpha=1.0)
    tracker = PerConditionStatTracker(32, 8)  # an independent copy of the advantage bookkeeping
    g = torch.Generator().manual_seed(0)
    seen = {"rewards": [], "losses": []}
    for it in range(2):  # the second iteration normalizes with a 16-reward window: its advantages do not average 0
        seen["losses"].clear()
        stats = method.train_iteration(_ctx(policy, it, g, seen))
        adv = tracker.advantages(seen["rewards"][-1], [None] * 8).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        assert stats["clip_fraction"] == 0.0  # ratio 1 everywhere
        # each minibatch's loss is -mean A over its 4 chains x T steps; "loss" is the mean over the 2 minibatches
        assert stats["loss"] == pytest.approx(-float(adv.mean()), abs=1e-9)
        assert sum(seen["losses"]) == pytest.approx(-2 * float(adv.mean()), abs=1e-9)
        assert stats["final_step_kl"] > 0 and stats["path_kl"] > stats["final_step_kl"]
    assert abs(float(adv.mean())) > 1e-3
    traj = policy.sample(4, generator=torch.Generator().manual_seed(1))
    for k in range(T):
        logp = policy.step_log_prob(traj.states[:, k], traj.states[:, k + 1], k)
        torch.testing.assert_close(logp, traj.log_probs[:, k], rtol=0, atol=1e-10)
        ratio_loss = ppo_clip_loss((logp - traj.log_probs[:, k]).detach(), torch.arange(4.0).double(), 1e-3)
        assert float(ratio_loss) == pytest.approx(-1.5)  # ratio 1: -mean A


@pytest.mark.parametrize("kwargs", [{"sampler_steps": 0}, {"final_std": 0.0}, {"clip_range": 0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        RLCMConfig(**kwargs).validate()


# ---- through the Trainer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consistency_files(tmp_path_factory):
    """{task: consistency model file} distilled with few steps (the default is 3000) for gmm1 and gaussian."""
    from sqdf.tasks import TASKS, default_task_config

    folder = tmp_path_factory.mktemp("consistency")
    files = {}
    for name in ("gmm1", "gaussian"):
        files[name] = str(folder / f"{name}.safetensors")
        TASKS[name](dataclasses.replace(default_task_config(name), consistency_path=files[name])).consistency_model(
            steps=300)
    return files


def test_build_policy_hook_gives_the_consistency_policy_without_naming_the_method(consistency_files):
    from sqdf.models.toy_consistency import ToyConsistencyModel
    from sqdf.training.run_setup import build_policy, default_config, make_task

    config = default_config("rlcm", "gmm1")
    config.set("task.consistency_path", consistency_files["gmm1"], raw=False)
    task = make_task("gmm1", config.task)
    policy = build_policy(task, config, None, torch.device("cpu"))  # as sqdf.training.saved_runs.load_run calls it
    assert isinstance(policy.schedule, ConsistencySchedule) and policy.prediction_type == "sample"
    assert policy.num_steps == 4 and float(policy.schedule.sigmas[-1]) == 0.3  # the gmm1 preset
    assert isinstance(policy.reference, ToyConsistencyModel) and policy.model is not policy.reference
    assert all(p.requires_grad for p in policy.trainable_parameters()) and policy.trainable_parameters()
    assert not any(p.requires_grad for p in policy.reference.parameters())
    ddpo = build_policy(task, default_config("ddpo", "gmm1"), None, torch.device("cpu"))
    assert type(ddpo.schedule) is NoiseSchedule  # other methods keep the task's policy


QUIET = ["--set", "trainer.progress=false", "--set", "trainer.device=cpu", "--set", "trainer.plots=false",
         "--set", "trainer.tensorboard=false", "--set", "trainer.eval_samples=256", "--set", "method.batch_size=16",
         "--set", "trainer.checkpoint_every=2", "--set", "trainer.eval_every=4", "--seed", "3"]


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_seconds"}
            for line in open(run_dir / "metrics.jsonl")]


def test_resume_equals_uninterrupted_and_sqdf_sample_reloads_the_policy(consistency_files, tmp_path):
    from sqdf.cli import main
    from sqdf.training.saved_runs import load_run, sample_run

    cm = ["--set", f"task.consistency_path={consistency_files['gmm1']}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "gmm1", "--method", "rlcm", "--steps", "6", "--out", str(full), *QUIET, *cm]) == 0
    assert main(["train", "gmm1", "--method", "rlcm", "--steps", "4", "--out", str(part), *QUIET, *cm]) == 0
    assert main(["resume", str(part), "--steps", "6"]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    a.pop("wall_seconds"), b.pop("wall_seconds")
    assert a == b and a["method"] == "rlcm" and a["num_inference_steps"] == 4
    assert _rows(full) == _rows(part)
    sa = torch.load(full / "checkpoints" / "ckpt_0000006.pt", weights_only=True)
    sb = torch.load(part / "checkpoints" / "ckpt_0000006.pt", weights_only=True)
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key

    run = load_run(str(full))
    assert isinstance(run.policy.schedule, ConsistencySchedule) and run.iteration == 6
    for key, value in run.policy.model.state_dict().items():
        assert torch.equal(value, sa["model"][key]), key
    samples, _, rewards = sample_run(run, 32, seed=1)
    assert samples.shape == (32, 2) and torch.isfinite(rewards).all()


def test_rlcm_improves_reward_on_a_small_toy_run(train_on_gaussian, consistency_files):
    base, final = train_on_gaussian("rlcm", steps=25, **{"task.consistency_path": consistency_files["gaussian"],
                                                         "method.lr": 1e-3, "method.batch_size": 32,
                                                         "method.final_std": 0.2})
    assert final["num_inference_steps"] == 4
    assert final["reward_mean"] > base["reward_mean"] + 0.3


def test_digits_policy_is_a_trainable_copy_of_the_shipped_consistency_model(tmp_path):
    from sqdf.digits.consistency import ConsistencyModel
    from sqdf.training.run_setup import build_policy, default_config, make_task

    config = default_config("rlcm", "digits")
    config.set("task.digit_condition", "1,7", raw=False)
    task = make_task("digits", config.task)
    policy = build_policy(task, config, None, torch.device("cpu"))
    assert isinstance(policy.model, ConsistencyModel) and isinstance(policy.reference, ConsistencyModel)
    assert policy.schedule.clip_sample == 1.0 and float(policy.schedule.sigmas[-1]) == 0.05
    ref_state = policy.reference.state_dict()
    for key, value in policy.model.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    cond = task.sample_conditions(3, torch.Generator().manual_seed(0))
    traj = policy.sample(3, cond, torch.Generator().manual_seed(0))
    assert traj.samples.shape == (3, 1, 8, 8) and float(traj.path_kl.abs().max()) == 0.0
    assert float(traj.samples.abs().max()) < 1.0 + 6 * 0.05  # clipped x0 plus the last step's noise

    # the fine-tuned consistency model is exported in the shipped format and reloads as one
    from sqdf.digits.store import load_model

    path = str(tmp_path / "model.safetensors")
    task.export_model(policy.model, path)
    reloaded, _ = load_model(path, "consistency")
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
