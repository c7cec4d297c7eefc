"""`sqdf blackbox` on a text-to-image task: the proxy is fit on CLIP image embeddings of the decoded latents (the
reward's own CLIP model, or task.proxy_clip), differentiable in the latents, and a proxy round runs end to end."""

from __future__ import annotations

import pytest
import torch

from sqdf.errors import ConfigError


def test_proxy_features_are_clip_embeddings_of_decoded_latents(sd_run):
    from sqdf.blackbox.proxy import EnsembleProxy
    from sqdf.sd.rewards.clip_score import clip_image_embeds

    trainer = sd_run("sd15-aesthetic", "sqdf")
    task = trainer.task
    fm = task.proxy_features()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, *task.sample_shape, generator=g, requires_grad=True)
    cond = torch.tensor([0, 1, 2, 0, 1, 2])
    f = fm(x, cond)
    clip = task.reward_model.clip
    d = clip.config.projection_dim
    assert f.shape == (6, d + len(task.prompts)) and fm.dim == f.shape[1]
    emb = clip_image_embeds(clip, task.decode(x.detach()), task.reward_model.mean, task.reward_model.std)
    torch.testing.assert_close(f[:, :d], emb / emb.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert torch.equal(f[:, d:].argmax(1), cond)
    f[:, :d].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    proxy = EnsembleProxy(fm, members=2, hidden=8, epochs=5, seed=0)
    proxy.fit(x.detach(), cond, torch.linspace(0, 1, 6))
    assert proxy(x.detach(), cond).shape == (6,)


def test_reward_without_clip_needs_proxy_clip(sd_run):
    trainer = sd_run("sd15-aesthetic", "sqdf")
    task = trainer.task
    task.reward_model = torch.nn.Linear(1, 1)  # stands in for a reward with no CLIP tower (e.g. JPEG size)
    with pytest.raises(ConfigError, match="task.proxy_clip"):
        task.proxy_features()


def test_blackbox_round_on_a_tiny_pipeline(tiny_pipes, tiny_reward_root, tmp_path):
    from sqdf.blackbox.loop import BlackboxRun
    from sqdf.blackbox.run_folder import BlackboxConfig
    from sqdf.sd.tiny import write_tiny_reward_weights
    from sqdf.tasks import tiny_overrides
    from sqdf.training.run_setup import default_config

    config = default_config("sqdf", "sd15-aesthetic")
    config.update(tiny_overrides("sqdf"))
    for key, value in {"trainer.eval_samples": 2, "trainer.plots": False, "trainer.tensorboard": False,
                       "trainer.progress": False, "trainer.device": "cpu", "task.num_inference_steps": 2,
                       "task.model": tiny_pipes["sd15"],
                       "task.reward_weights": write_tiny_reward_weights("aesthetic", tiny_reward_root)}.items():
        config.set(key, value, raw=False)
    torch.set_num_threads(1)
    bb = BlackboxConfig(budget=8, round_shares="1,1", inner_steps=1, eval_samples=2)
    run = BlackboxRun("sd15-aesthetic", "sqdf", config, bb, str(tmp_path / "bb"))
    rows = run.run()
    assert [r["queries"] for r in rows] == [0, 4, 8] and run.oracle.spent == 8
    assert all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in rows)
