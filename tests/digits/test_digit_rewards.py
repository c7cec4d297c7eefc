import pytest
import torch
from torch import nn

from sqdf.digits.rewards import ClassifierLogProb, ink, jpeg_compressibility, png_compressibility


class LinearClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 10)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_classifier_log_prob_fixed_and_shifted_targets():
    clf = LinearClassifier()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    logp = torch.log_softmax(clf(x), 1)
    assert torch.allclose(ClassifierLogProb(clf, digit=3)(x), logp[:, 3])
    cond = torch.tensor([0, 1, 8, 9, 4])
    shifted = ClassifierLogProb(clf, digit=None, offset=2)(x, cond)
    assert torch.allclose(shifted, logp[torch.arange(5), (cond + 2) % 10])
    with pytest.raises(ValueError, match="condition"):
        ClassifierLogProb(clf, digit=None)(x, None)


def test_classifier_reward_gradient_matches_finite_differences():
    clf = LinearClassifier().double()
    reward = ClassifierLogProb(clf, digit=7)
    x = (torch.rand(1, 1, 8, 8, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    reward(x).sum().backward()
    direction = torch.randn_like(x)
    h = 1e-6
    fd = (reward(x + h * direction) - reward(x - h * direction)) / (2 * h)
    assert torch.allclose((x.grad * direction).sum(), fd.sum(), rtol=1e-5)
    assert all(not p.requires_grad for p in clf.parameters())  # the reward's classifier is frozen


def test_ink_and_compressibility():
    blank = -torch.ones(2, 1, 8, 8)
    full = torch.ones(2, 1, 8, 8)
    assert torch.allclose(ink(blank), torch.zeros(2)) and torch.allclose(ink(full), torch.ones(2))
    noisy = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for fn in (png_compressibility, jpeg_compressibility):
        r_blank, r_noisy = fn(blank), fn(noisy)
        assert r_blank.shape == (2,) and bool((r_blank > r_noisy).all())  # a blank image compresses better
        assert bool((r_blank < 0).all())
