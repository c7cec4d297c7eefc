"""DenseDPO: the window loss by hand, aligned pairs and their restart marginal, query accounting, config errors,
and a toy run that moves toward p*."""

from __future__ import annotations

import math

import pytest
import torch

from sqdf.errors import ConfigError
from sqdf.methods import METHODS
from sqdf.methods.base import IterationContext
from sqdf.methods.d3po import d3po_loss
from sqdf.methods.dense_dpo import (
    DenseDPO,
    DenseDPOConfig,
    aligned_pairs,
    dense_dpo_loss,
    redenoised_steps,
    window_bounds,
    window_log_ratios,
)

sp = lambda v: math.log(1 + math.exp(-v))  # noqa: E731  -log sigmoid(v)


def _gaussian_policy(steps: int = 10):
    from sqdf.training.run_setup import build_policy, default_config, make_task

    config = default_config("dense-dpo", "gaussian")
    config.set("task.num_inference_steps", steps, raw=False)
    task = make_task("gaussian", config.task)
    return task, build_policy(task, config, None, "cpu")


def test_window_bounds_cover_the_steps():
    assert window_bounds(5, 1) == [(0, 5)]
    assert window_bounds(5, 2) == [(0, 2), (2, 5)]
    assert window_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError):
        window_bounds(3, 4)
    assert redenoised_steps(0.5, 100) == 50 and redenoised_steps(0.25, 10) == 3 and redenoised_steps(1.0, 7) == 7


def test_dense_dpo_loss_hand_computed():
    h_a = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.3, -0.1], [0.5, 0.5, 0.5]])
    h_b = torch.tensor([[0.0, 0.1, 0.1], [0.2, 0.3, 0.0], [0.0, 0.0, 0.0]])
    windows = [(0, 1), (1, 3)]
    labels = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.5, 0.5]])  # pair 2: all ties, dropped from the mean
    loss, margins = dense_dpo_loss(h_a, h_b, labels, windows, beta=2.0)
    torch.testing.assert_close(margins, torch.tensor([[0.2, 2 * (-0.3 + 0.2)], [-0.4, 2 * (0.0 - 0.1)],
                                                      [1.0, 2.0]]))
    pair0 = sp(0.2) + sp(0.2)  # window 1: a won (m 0.2); window 2: b won (m -0.2)
    pair1 = sp(-0.2)  # window 1 tied; window 2: a won (m -0.2)
    assert float(loss) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)
    # the step form: one sigmoid per step with the window's label
    loss, _ = dense_dpo_loss(h_a, h_b, labels, windows, beta=2.0, form="step")
    pair0 = sp(0.2) + sp(0.6) + sp(-0.4)
    pair1 = sp(0.0) + sp(-0.2)
    assert float(loss) == pytest.approx((pair0 + pair1) / 2, rel=1e-6)
    # one window in step form is D3PO's loss
    lab = torch.tensor([[1.0], [0.0], [0.5]])
    ours, _ = dense_dpo_loss(h_a, h_b, lab, [(0, 3)], beta=1.5, form="step")
    theirs, _ = d3po_loss(h_a, h_b, lab[:, 0], beta=1.5)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    # only ties: zero loss, still differentiable
    h = h_a.clone().requires_grad_(True)
    tie, _ = dense_dpo_loss(h, h_b, torch.full((3, 2), 0.5), windows, beta=1.0)
    tie.backward()
    assert float(tie.detach()) == 0.0 and float(h.grad.abs().sum()) == 0.0


def test_aligned_pairs_restart_marginal_and_closeness():
    _, policy = _gaussian_policy(steps=20)
    g = torch.Generator().manual_seed(0)
    T = policy.num_steps
    # small guidance: one step re-denoised; both chains end near each other and near their source
    small = aligned_pairs(policy, 256, 0.05, None, g)
    assert small.start == T - 1 and small.states.shape == (512, 2, 2) and small.ref_log_probs.shape == (512, 1)
    src = small.sources.repeat_interleave(2, 0)
    ends = small.states[:, -1]
    pair_gap = (ends[0::2] - ends[1::2]).norm(dim=1).mean()
    assert float((ends - src).norm(dim=1).mean()) < 0.35 and float(pair_gap) < 0.45
    full = aligned_pairs(policy, 256, 1.0, None, g)  # independent chains from fresh noise: far apart
    assert full.start == 0 and full.sources is None and full.states.shape == (512, T + 1, 2)
    assert float((full.states[0::2, -1] - full.states[1::2, -1]).norm(dim=1).mean()) > 3 * float(pair_gap)
    assert not torch.equal(full.states[0::2, 0], full.states[1::2, 0])
    assert abs(float(full.states[:, 0].std()) - 1.0) < 0.1
    # the restart state given x0: mean signal x0 (sqrt(abar) for VP), variance noise^2 = 1 - abar, on many draws
    x0 = torch.tensor([[1.5, -2.0]])
    policy.sample = lambda n, cond=None, generator=None, **kw: type("T", (), {  # a fixed source
        "samples": x0.expand(n, 2).clone(), "path_kl": torch.zeros(n)})()
    mid = aligned_pairs(policy, 4000, 0.5, None, g)
    k = mid.start
    assert k == T // 2
    abar = policy.abar(k)
    assert float(policy.schedule.signal[k]) == pytest.approx(math.sqrt(abar), rel=1e-6)
    xs = mid.states[:, 0]
    torch.testing.assert_close(xs.mean(0), math.sqrt(abar) * x0[0], atol=0.06, rtol=0)
    torch.testing.assert_close(xs.var(0), torch.full((2,), 1 - abar), atol=0.06, rtol=0)
    assert not torch.equal(xs[0::2], xs[1::2])  # independent noise for the two copies


def test_log_ratios_of_the_redenoised_steps_vanish_at_the_reference():
    _, policy = _gaussian_policy(steps=10)
    data = aligned_pairs(policy, 4, 0.5, None, torch.Generator().manual_seed(2))
    h = window_log_ratios(policy, data, "sum")
    assert h.shape == (8, 5) and h.requires_grad
    assert float(h.detach().abs().max()) == 0.0  # the sampler's reference log-probs, re-scored at the right steps


def test_one_iteration_spends_two_queries_per_pair_and_window():
    task, policy = _gaussian_policy(steps=8)
    config = DenseDPOConfig(batch_size=6, segments=4, guidance=0.5)
    method = DenseDPO(config, policy, alpha=task.alpha)
    assert method.windows == [(0, 1), (1, 2), (2, 3), (3, 4)]
    spent = []

    def reward(x, cond):
        spent.append(x.shape[0])
        return task.reward(x, cond)

    def no_rollout(*args, **kwargs):
        raise AssertionError("dense-dpo draws its sources unscored")

    opt = torch.optim.SGD(method.parameters(), lr=0.0)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"grad_norm": 0.0}

    ctx = IterationContext(0, torch.Generator().manual_seed(1), no_rollout, reward, step)
    stats = method.train_iteration(ctx)
    assert sum(spent) == 3 * 2 * 4
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert 0 <= stats["ties"] <= 1 and "source_distance" in stats


@pytest.mark.parametrize("kwargs", [{"batch_size": 7}, {"beta": 0.0}, {"label_temperature": -1.0},
                                    {"log_ratio": "avg"}, {"guidance": 0.0}, {"guidance": 1.5},
                                    {"segments": 0}, {"loss_form": "path"}, {"inner_steps": 0}])
def test_config_errors_name_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        DenseDPOConfig(**kwargs).validate()


def test_segments_checked_against_the_sampler_at_construction():
    task, policy = _gaussian_policy(steps=10)
    with pytest.raises(ConfigError, match=r"segments=6 exceeds the 5 re-denoised steps.*segments <= 5"):
        DenseDPO(DenseDPOConfig(guidance=0.5, segments=6), policy, alpha=task.alpha)
    with pytest.raises(ConfigError, match="guidance=0.01"):
        DenseDPO(DenseDPOConfig(guidance=0.01), policy, alpha=task.alpha)
    assert METHODS["dense-dpo"] is DenseDPO
    assert DenseDPO(DenseDPOConfig(label_temperature=2.0), policy, alpha=task.alpha).beta == task.alpha / 2


def test_dense_dpo_improves_reward_with_honest_query_count(train_on_gaussian):
    base, final = train_on_gaussian("dense-dpo", steps=25, **{"method.lr": 3e-3, "method.batch_size": 32,
                                                              "method.label_temperature": 0.0,  # perfect labels
                                                              "method.guidance": 0.5, "method.segments": 2})
    assert final["reward_mean"] > base["reward_mean"] + 0.3
    assert final["reward_queries"] == 25 * 32 * 2


def test_cli_smoke(tmp_path, capsys):
    import json

    from sqdf.cli import main

    out = tmp_path / "run"
    code = main(["train", "gaussian", "--method", "dense-dpo", "--out", str(out), "--set", "trainer.steps=2",
                 "--set", "trainer.progress=false", "--set", "trainer.eval_samples=64", "--set", "trainer.plots=false",
                 "--set", "trainer.tensorboard=false", "--set", "trainer.floor=false", "--set", "trainer.device=cpu",
                 "--set", "task.num_inference_steps=8", "--set", "method.batch_size=8", "--set", "method.segments=2"])
    capsys.readouterr()
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward_queries"] == 2 * 4 * 2 * 2
