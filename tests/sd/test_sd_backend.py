"""The diffusers backend on tiny random pipelines: guidance, the adapter reference, every method, LoRA files that
diffusers reads back, exact resume, the consistency estimator, and clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sqdf.errors import ConfigError, MissingWeightsError

TRAINED = ["sqdf", "sqdf-paper", "ddpo", "dpok", "draft", "alignprop", "refl", "prdp", "d3po", "dense-dpo", "dro"]


def _perturb_lora(net, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name and ".policy." in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def test_guided_denoiser_and_adapter_reference_match_direct_unet_calls(sd_run):
    trainer = sd_run("sd15-aesthetic", "sqdf")
    task, policy = trainer.task, trainer.policy
    net = task.denoiser.net
    _perturb_lora(net)
    pipe = task.pipe
    x = torch.randn(3, *task.sample_shape, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([0, 5, 7])
    k = 1
    t = policy._timesteps[k].expand(3)
    emb, neg = pipe.encode_prompt([task.prompts[i] for i in cond], "cpu", 1, True)
    w = task.config.guidance_scale

    def guided():
        uncond = net(x, t, encoder_hidden_states=neg).sample
        text = net(x, t, encoder_hidden_states=emb).sample
        return uncond + w * (text - uncond)

    with torch.no_grad():
        want_policy = guided()
        net.disable_adapters()
        want_ref = guided()
        net.enable_adapters()
        got_policy = policy._net("policy", x, policy._levels(x, k), cond)
        got_ref = policy._net("reference", x, policy._levels(x, k), cond)
    torch.testing.assert_close(got_policy, want_policy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_ref, want_ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got_policy, got_ref)  # the adapter changes the output; the reference ignores it
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".policy." in n and "lora_" in n for n in trainable)  # switching left them alone


@pytest.mark.parametrize("method", TRAINED + ["best_of_n", "fk_steering"])
def test_every_method_runs_on_tiny_sd15(sd_run, method):
    trainer = sd_run("sd15-aesthetic", method)
    net = trainer.task.denoiser.net
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert summary["iterations"] == (1 if method in TRAINED else 0)
    assert torch.isfinite(torch.tensor(summary["reward_mean"]))
    after = {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    moved = any(not torch.equal(before[n], after[n]) for n in before)
    assert moved == (method in TRAINED)
    if method in TRAINED:
        ckpt = sorted(os.listdir(os.path.join(trainer.out_dir, "checkpoints")))[-1]
        state = torch.load(os.path.join(trainer.out_dir, "checkpoints", ckpt), weights_only=False)
        assert set(state["model"]) == set(before)  # LoRA only, not the frozen base
        assert os.path.exists(os.path.join(trainer.out_dir, "lora", "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("value, per_pair", [("mc", 2), ("critic", 0), ("paper", 1)])
def test_sqdf_soft_values_run_through_the_unet(sd_run, value, per_pair):
    # tiny presets: 2 chains, 2 pairs per policy step; mc: 2 reference chains of 2 UNet steps per pair
    trainer = sd_run("sd15-aesthetic", "sqdf", **{"method.value": value, "method.mc_samples": 2,
                                                  "method.mc_steps": 2})
    net = trainer.task.denoiser.net
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert summary["reward_queries"] == 2 + 2 * per_pair
    assert any(not torch.equal(before[n], p.detach()) for n, p in net.named_parameters() if p.requires_grad)
    if value == "critic":  # the critic (a conv net on latents) and its optimizer are part of the checkpoint
        ckpt = sorted(os.listdir(os.path.join(trainer.out_dir, "checkpoints")))[-1]
        state = torch.load(os.path.join(trainer.out_dir, "checkpoints", ckpt), weights_only=False)
        assert "critic" in state["method"] and state["method"]["buffer"]["x0s"] is not None


def test_exact_value_is_refused_on_sd(sd_run):
    from sqdf.errors import ConfigError

    with pytest.raises(ConfigError, match="method.value=exact needs"):
        sd_run("sd15-aesthetic", "sqdf", **{"method.value": "exact"})


@pytest.mark.parametrize("task", ["sdxl-aesthetic", "sd3-aesthetic"])
def test_sdxl_and_flow_presets_train(sd_run, task):
    trainer = sd_run(task, "sqdf")
    summary = trainer.train()
    assert summary["iterations"] == 1 and torch.isfinite(torch.tensor(summary["path_kl"]))
    if task == "sd3-aesthetic":
        assert trainer.policy.prediction_type == "flow"
        assert bool((trainer.policy._sigmas > 0).all())


@pytest.mark.parametrize("lora_alpha", [None, 8.0])
@pytest.mark.parametrize("task", ["sd15-aesthetic", "sdxl-aesthetic", "sd3-aesthetic"])
def test_saved_lora_loads_into_a_diffusers_pipeline(sd_run, tiny_pipes, task, lora_alpha):
    """The exported adapter, loaded in a fresh pipeline, is the trained model, also at alpha != rank (scale 2)."""
    from diffusers import DiffusionPipeline

    trainer = sd_run(task, "alignprop", **{"task.lora_rank": 4, "task.lora_alpha": lora_alpha})
    trainer.train()
    net = trainer.task.denoiser.net
    _perturb_lora(net, seed=3)  # nonzero B so that the check cannot pass with an empty adapter
    trainer.task.export_model(trainer.task.denoiser, os.path.join(trainer.out_dir, "model.safetensors"))
    kind = trainer.task.kind
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3" else {}
    if kind == "sd15":
        kwargs = {"safety_checker": None}
    pipe = DiffusionPipeline.from_pretrained(tiny_pipes[kind], local_files_only=True, **kwargs)
    pipe.load_lora_weights(os.path.join(trainer.out_dir, "lora"))
    other = pipe.transformer if kind == "sd3" else pipe.unet
    x = torch.randn(2, *trainer.task.sample_shape)
    emb = torch.randn(2, 5, 32 if kind == "sd15" else 64)
    pooled, time_ids = torch.randn(2, 64 if kind == "sd3" else 32), torch.randn(2, 6)

    def call(model):
        if kind == "sd3":
            return model(hidden_states=x, timestep=torch.tensor([500.0, 250.0]), encoder_hidden_states=emb,
                         pooled_projections=pooled).sample
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if kind == "sdxl" else {}
        return model(x, torch.tensor([500, 250]), encoder_hidden_states=emb, **extra).sample

    with torch.no_grad():
        ours, theirs = call(net), call(other)
        other.disable_adapters()
        base = call(other)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-5)


def test_resume_continues_exactly(sd_run, tmp_path):
    from sqdf.training.trainer import Trainer

    straight = sd_run("sd15-aesthetic", "sqdf", steps=2, out=str(tmp_path / "straight"))
    straight.train()
    first = sd_run("sd15-aesthetic", "sqdf", steps=1, out=str(tmp_path / "split"))
    first.train()
    resumed = Trainer.resume(str(tmp_path / "split"))
    resumed.config.set("trainer.steps", 2, raw=False)
    resumed.train()
    a = straight.task.denoiser.trainable_state_dict()
    b = resumed.task.denoiser.trainable_state_dict()
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    rows = lambda d: [json.loads(r) for r in open(d / "metrics.jsonl") if '"train"' in r]  # noqa: E731
    assert [r["loss"] for r in rows(tmp_path / "straight")] == [r["loss"] for r in rows(tmp_path / "split")]


def test_consistency_estimator_from_an_lcm_lora(sd_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sqdf.sd.adapters import CONSISTENCY_ADAPTER
    from sqdf.sd.tiny import write_tiny_lcm_lora

    lcm = write_tiny_lcm_lora(str(tmp_path / "lcm"), seed=4)
    trainer = sd_run("sd15-aesthetic", "sqdf", **{"method.estimator": "consistency", "task.consistency_path": lcm})
    task, policy = trainer.task, trainer.policy
    net = task.denoiser.net
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".policy." in n for n in trainable)  # the LCM adapter is frozen
    assert any(f".{CONSISTENCY_ADAPTER}." in n for n, _ in net.named_parameters())
    x = torch.randn(2, *task.sample_shape)
    cond = torch.tensor([1, 2])
    k = 1
    t = policy._timesteps[k].expand(2)
    with torch.no_grad():
        got = policy.consistency_model(x, t, cond)
        pipe = StableDiffusionPipeline.from_pretrained(task.config.model, local_files_only=True, safety_checker=None)
        pipe.load_lora_weights(lcm)
        emb, _ = pipe.encode_prompt([task.prompts[i] for i in cond], "cpu", 1, False)
        eps = pipe.unet(x, t, encoder_hidden_states=emb).sample
        a = policy.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        st = 10.0 * t.float().view(-1, 1, 1, 1)
        want = 0.25 / (st**2 + 0.25) * x + st / (st**2 + 0.25).sqrt() * x0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    summary = trainer.train()
    assert summary["iterations"] == 1


def test_consistency_estimator_from_an_lcm_unet(sd_run, tmp_path):
    from sqdf.sd.tiny import write_tiny_lcm_unet

    lcm = write_tiny_lcm_unet(str(tmp_path / "lcm_unet"))
    trainer = sd_run("sd15-aesthetic", "sqdf", **{"method.estimator": "consistency", "task.consistency_path": lcm})
    x = torch.randn(2, *trainer.task.sample_shape, requires_grad=True)
    x0 = trainer.policy.consistency_model(x, trainer.policy._timesteps[1].expand(2), torch.tensor([0, 1]))
    x0.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()  # differentiable in the state
    assert trainer.train()["iterations"] == 1


def test_bad_paths_give_clear_errors(sd_run, tiny_pipes, tmp_path):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        sd_run("sd15-aesthetic", "sqdf", **{"task.model": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        sd_run("sd15-aesthetic", "sqdf", **{"task.model": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="sd3 pipeline but this task expects sd15"):
        sd_run("sd15-aesthetic", "sqdf", **{"task.model": tiny_pipes["sd3"]})
    with pytest.raises(MissingWeightsError, match="aesthetic"):
        sd_run("sd15-aesthetic", "sqdf", **{"task.reward_weights": str(tmp_path / "no_reward")})
    with pytest.raises(ConfigError, match="consistency_path"):
        sd_run("sd15-aesthetic", "sqdf", **{"method.estimator": "consistency"})
    with pytest.raises(ConfigError, match="black-box"):
        sd_run("sd15-aesthetic", "alignprop", **{"task.reward": "jpeg_compressibility",
                                                 "task.reward_weights": None})


def test_cli_tiny_preset_runs_end_to_end(tmp_path, monkeypatch, capsys):
    from sqdf.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the tiny models are cached under ~/.cache/sqdf
    torch.set_num_threads(1)
    out = tmp_path / "run"
    assert main(["train", "sd15-aesthetic", "--tiny", "--steps", "1", "--out", str(out),
                 "--set", "task.num_inference_steps=2", "--set", "trainer.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "batch arithmetic: 2 chains per process x 1 process(es)" in printed
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert main(["train", "digits", "--tiny", "--out", str(tmp_path / "d")]) == 2
    assert "apply to the diffusers tasks" in capsys.readouterr().err


def test_sample_command_reloads_the_lora_run(sd_run, tmp_path, capsys):
    from sqdf.cli import main

    trainer = sd_run("sd15-aesthetic", "sqdf", out=str(tmp_path / "run"))
    trainer.train()
    out = tmp_path / "s.png"
    assert main(["sample", str(tmp_path / "run"), "--n", "2", "--cond", "3,4", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "s.safetensors").exists()
    assert "sd15-aesthetic: sqdf at iteration 1" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_sqdf_gradient(sd_run):
    """Checkpointed blocks are recomputed with the adapters active at their first run (the reference call in the
    Tweedie estimate has them off), so the gradient equals the one without checkpointing."""

    def grad(checkpointing: bool) -> torch.Tensor:
        trainer = sd_run("sd15-aesthetic", "sqdf", **{"task.gradient_checkpointing": checkpointing,
                                                      "task.num_inference_steps": 3})
        policy, net = trainer.policy, trainer.task.denoiser.net
        _perturb_lora(net, seed=5)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *trainer.task.sample_shape, generator=g)
        cond = torch.tensor([1, 2])
        policy.train()
        x_next, mean, ref_mean = policy.reparameterized_step(x, 0, cond, torch.randn(x.shape, generator=g))
        x0 = trainer.method.estimator(policy, x_next, 1, cond)
        (trainer.task.reward(x0, cond).sum() - policy.step_kl(mean, ref_mean, 0).sum()).backward()
        return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])

    plain, checkpointed = grad(False), grad(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def test_weighted_sum_reward_reports_its_terms_on_full_images(sd_run, tiny_reward_root):
    from sqdf.sd.tiny import write_tiny_reward_weights

    spec = "aesthetic+0.5*clip"
    trainer = sd_run("sd15-aesthetic", "sqdf", **{"task.reward": spec, "trainer.eval_samples": 4,
                                                  "task.reward_weights": write_tiny_reward_weights(spec,
                                                                                                   tiny_reward_root)})
    metrics, _ = trainer.evaluate()
    assert {"reward_aesthetic", "reward_clip"} <= set(metrics)
    combined = metrics["reward_aesthetic"] + 0.5 * metrics["reward_clip"]
    assert abs(metrics["reward_mean"] - combined) < 1e-4 * max(1.0, abs(combined))


@pytest.mark.parametrize("method", ["diffusion-dpo", "inpo", "dro"])
def test_offline_preference_methods_run_on_tiny_sd15(sd_run, tmp_path, method):
    """Pairs (or scores) of the tiny pipeline's own latents and prompt conditions, written to a file and read back:
    one LoRA step, no reward query."""
    from sqdf.preferences import PreferencePairs, write_pairs
    from sqdf.preferences.data import PointwiseScores, write_scores

    probe = sd_run("sd15-aesthetic", "ddpo")
    cond = probe.task.sample_conditions(4, torch.Generator().manual_seed(0))
    x = probe.policy.sample(8, torch.cat([cond, cond]), torch.Generator().manual_seed(1)).samples.detach()
    if method == "dro":
        path = write_scores(PointwiseScores(x[:4], torch.randn(4), cond), str(tmp_path / "scores.parquet"))
    else:
        path = write_pairs(PreferencePairs(x[:4], x[4:], torch.tensor([1.0, 0.0, 1.0, 0.5]), cond),
                           str(tmp_path / "pairs.parquet"))
    extra = {"method.samples_per_step": 2} if method == "dro" else {"method.pairs_per_step": 2}
    trainer = sd_run("sd15-aesthetic", method, out=str(tmp_path / "run"), **{"method.data": path}, **extra)
    net = trainer.task.denoiser.net
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert summary["iterations"] == 1 and summary["reward_queries"] == 0
    assert any(not torch.equal(before[n], p.detach()) for n, p in net.named_parameters() if p.requires_grad)
