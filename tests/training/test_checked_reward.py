"""CheckedReward: honest query counting and a clear RewardError for every way a user's reward can misbehave."""

from __future__ import annotations

import pytest
import torch

from sqdf.errors import RewardError, SqdfError
from sqdf.training.checked_reward import CheckedReward


def linear(x, cond=None):
    return x.sum(1)


def test_returns_the_reward_and_passes_cond_through():
    seen = {}

    def fn(x, cond):
        seen["cond"] = cond
        return x[:, 0] * 2

    reward = CheckedReward(fn)
    x = torch.arange(6.0).view(3, 2)
    cond = torch.tensor([1, 2, 3])
    r = reward(x, cond)
    assert torch.equal(r, torch.tensor([0.0, 4.0, 8.0]))
    assert seen["cond"] is cond


def test_counts_every_sample_as_one_query():
    reward = CheckedReward(linear)
    assert reward.queries == 0
    reward(torch.zeros(5, 2))
    assert reward.queries == 5
    reward(torch.zeros(3, 2))
    assert reward.queries == 8


def test_count_false_does_not_count():
    reward = CheckedReward(linear)
    reward(torch.zeros(4, 2))
    reward(torch.zeros(100, 2), count=False)
    reward(torch.zeros(7, 2), None, False)
    assert reward.queries == 4


def test_counts_batch_not_elements_for_images():
    reward = CheckedReward(lambda x, c: x.flatten(1).mean(1))
    reward(torch.zeros(3, 1, 4, 4))
    assert reward.queries == 3


def test_gradient_flows_through():
    reward = CheckedReward(lambda x, c: (x ** 2).sum(1))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    reward(x).sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())


def test_a_reward_that_raises():
    def fn(x, cond):
        raise ValueError("boom at the reward")

    reward = CheckedReward(fn, name="my reward")
    with pytest.raises(RewardError) as err:
        reward(torch.zeros(4, 2))
    msg = str(err.value)
    assert "my reward" in msg
    assert "ValueError" in msg and "boom at the reward" in msg
    assert "(4, 2)" in msg  # the batch shape it failed on
    assert "[B]" in msg  # what is expected
    assert isinstance(err.value.__cause__, ValueError)
    assert reward.queries == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(bad):
    def fn(x, cond):
        r = x.sum(1)
        r[1] = bad
        return r

    reward = CheckedReward(fn, name="my reward")
    with pytest.raises(RewardError) as err:
        reward(torch.zeros(4, 2))
    msg = str(err.value)
    assert "my reward" in msg
    assert "1 NaN/inf values out of 4" in msg
    assert "finite" in msg
    assert reward.queries == 0


def test_all_nan_counts_them_all():
    reward = CheckedReward(lambda x, c: torch.full((x.shape[0],), float("nan")))
    with pytest.raises(RewardError, match="3 NaN/inf values out of 3"):
        reward(torch.zeros(3, 2))


@pytest.mark.parametrize(
    "fn,shape",
    [
        (lambda x, c: x.sum(1, keepdim=True), "(4, 1)"),  # [B, 1]
        (lambda x, c: x, "(4, 2)"),  # per-dimension
        (lambda x, c: x.sum(), "()"),  # scalar
        (lambda x, c: x.sum(1)[:3], "(3,)"),  # too few
    ],
)
def test_wrong_shape(fn, shape):
    reward = CheckedReward(fn, name="my reward")
    with pytest.raises(RewardError) as err:
        reward(torch.zeros(4, 2))
    msg = str(err.value)
    assert "my reward" in msg
    assert f"shape {shape}" in msg
    assert "[4]" in msg  # the shape it must have
    assert reward.queries == 0


@pytest.mark.parametrize(
    "fn,type_name",
    [
        (lambda x, c: x.sum(1).tolist(), "list"),
        (lambda x, c: x.sum(1).numpy(), "ndarray"),
        (lambda x, c: 1.0, "float"),
        (lambda x, c: None, "NoneType"),
    ],
)
def test_non_tensor(fn, type_name):
    reward = CheckedReward(fn, name="my reward")
    with pytest.raises(RewardError) as err:
        reward(torch.zeros(4, 2))
    msg = str(err.value)
    assert "my reward" in msg
    assert f"returned {type_name}" in msg
    assert "tensor" in msg
    assert reward.queries == 0


def test_reward_errors_are_sqdf_errors():
    assert issubclass(RewardError, SqdfError)
