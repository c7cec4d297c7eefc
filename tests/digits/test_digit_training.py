"""The training loops behind scripts/train_digits.py, run for a few steps on tiny networks."""

import torch

from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.digits.classifier import DigitClassifier
from sqdf.digits.data import load_digits_split
from sqdf.digits.training import distill_consistency, shift_augment, train_classifier, train_unet
from sqdf.digits.unet import DigitUNet


def test_shift_augment_moves_images_and_fills_background():
    x = -torch.ones(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1.0
    out = shift_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.allclose(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # a centered blob stays whole under a 1-px shift
    assert not torch.equal(out, x)


def test_classifier_and_unet_losses_fall(one_thread):
    train, _ = load_digits_split()
    clf_losses = train_classifier(DigitClassifier(width=8, feature_dim=8), train, steps=60, batch_size=32)
    assert sum(clf_losses[-10:]) < sum(clf_losses[:10])
    sched = NoiseSchedule(ScheduleConfig(kind="cosine"), 1)
    model = DigitUNet(channels=(8, 16), emb_dim=16)
    ema, losses = train_unet(model, train, sched, steps=60, batch_size=32, ema_decay=0.5)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert not torch.equal(ema.conv_out.weight, model.conv_out.weight)  # the EMA is a separate copy


def test_consistency_distillation_runs_and_keeps_the_boundary(one_thread):
    train, _ = load_digits_split()
    torch.manual_seed(0)
    teacher = DigitUNet(channels=(8, 16), emb_dim=16)
    student, losses = distill_consistency(teacher, train, guidance_scale=2.0, steps=20, batch_size=16,
                                          ema_decay=0.0)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(student(x, torch.tensor([0, 0]), torch.tensor([1, 2])), x)
    moved = any(not torch.equal(a, b) for a, b in zip(student.net.parameters(), teacher.parameters()))
    assert moved and all(not p.requires_grad for p in teacher.parameters())
