"""A peft LoRA policy: the reference is the same model with adapters disabled (no second copy)."""

import pytest
import torch

peft = pytest.importorskip("peft")

from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.diffusion.schedule import NoiseSchedule, ScheduleConfig
from sqdf.models.denoisers import MLPDenoiser  # noqa: E402


def _lora_policy():
    torch.manual_seed(0)
    base = MLPDenoiser(2, hidden=16, num_layers=2, num_train_steps=100)
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["body.0", "body.2", "out"], init_lora_weights=True)
    model = peft.get_peft_model(base, cfg)
    schedule = NoiseSchedule(ScheduleConfig(num_train_steps=100), num_inference_steps=5)
    return DiffusionPolicy(model, schedule, (2,)), model


def test_lora_policy_uses_disabled_adapters_as_reference():
    policy, model = _lora_policy()
    assert policy.reference is None  # no deep copy was made
    x = torch.randn(8, 2)
    # LoRA B starts at zero: policy == reference, zero KL
    traj = policy.sample(8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(traj.kls, torch.zeros_like(traj.kls))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    mean = policy.step_mean(x, 2, which="policy")
    ref = policy.step_mean(x, 2, which="reference")
    assert (mean - ref).abs().max() > 1e-4
    # the reference equals the base model's own prediction with adapters off
    with model.disable_adapter():
        t = torch.full((8,), policy.schedule.timesteps[2])
        base_pred = model(x, t)
    eps_ref, _ = policy.predict(x, 2, which="reference")
    assert torch.allclose(eps_ref, base_pred, atol=1e-6)


def test_lora_policy_trains_only_adapters():
    policy, model = _lora_policy()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    x = torch.randn(4, 2)
    x_next, mean, ref_mean = policy.reparameterized_step(x, 1, None, torch.randn(4, 2))
    (x_next**2).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
