"""Diffusion-DPO: the loss by hand, winner and loser sharing (t, eps), errors on data, and a toy run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sqdf.methods.diffusion_dpo import diffusion_dpo_loss, training_times


def test_diffusion_dpo_loss_hand_computed():
    err_w, err_l = torch.tensor([1.0, 0.5]), torch.tensor([1.2, 0.4])
    ref_w, ref_l = torch.tensor([1.1, 0.5]), torch.tensor([1.1, 0.5])
    loss, logits = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=10.0)
    # -beta/2 [(err_w - err_l) - (ref_w - ref_l)]: pair 0: -5 * (-0.2 - 0) = 1; pair 1: -5 * (0.1 - 0) = -0.5
    torch.testing.assert_close(logits, torch.tensor([1.0, -0.5]))
    torch.testing.assert_close(loss, -(F.logsigmoid(torch.tensor(1.0)) + F.logsigmoid(torch.tensor(-0.5))) / 2)


def test_training_times_cover_the_schedule():
    from sqdf.diffusion.schedule import FlowMatchSchedule, NoiseSchedule, ScheduleConfig

    g = torch.Generator().manual_seed(0)
    t = training_times(NoiseSchedule(ScheduleConfig(), 10), 5000, g)
    assert t.dtype == torch.long and int(t.min()) == 0 and int(t.max()) == 999
    s = training_times(FlowMatchSchedule(10), 5000, g)
    assert float(s.min()) > 0 and float(s.max()) < 1000 and s.dtype == torch.float64


def test_diffusion_dpo_on_pairs_of_the_base_moves_toward_the_winners(tmp_path, train_on_gaussian):
    """Pairs of the Gaussian task's base model labelled by its linear reward: training raises the reward, with
    no reward query."""
    from sqdf.training.preference_pairs import write_reference_pairs

    path = write_reference_pairs("gaussian", 512, str(tmp_path / "pairs.parquet"), temperature=0.0,
                                 settings={"task.num_inference_steps": 10})
    base, final = train_on_gaussian("diffusion-dpo", steps=40, **{"method.data": path, "method.lr": 3e-3,
                                                                  "method.beta": 50.0})
    assert final["reward_queries"] == 0
    assert final["reward_mean"] > base["reward_mean"] + 0.2
