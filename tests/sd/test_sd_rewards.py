"""The image reward zoo on tiny random CLIP models saved in the real folder layouts: values against hand
computations, gradients against finite differences, weighted sums, spec / weights parsing and missing-weights errors."""

from __future__ import annotations

import io
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sqdf.errors import ConfigError, MissingWeightsError
from sqdf.sd.rewards import (
    REWARDS,
    WeightedSum,
    load_reward,
    parse_reward_spec,
    parse_reward_weights,
)
from sqdf.sd.rewards.aesthetic import MLP_FILE, AestheticMLP
from sqdf.sd.rewards.base import clip_preprocess
from sqdf.sd.tiny import tiny_clip_config, write_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "a dog riding a bike", "zebra"]
LOGIT_SCALE = 7.0


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel folder with its tokenizer (the layout of the clip / pickscore rewards)."""
    from transformers import CLIPModel

    path = tmp_path_factory.mktemp("clip_model")
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
    model.save_pretrained(str(path))
    write_tiny_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="module")
def aes_dir(tmp_path_factory, clip_dir):
    """PATH/clip/ + PATH/sac+logos+ava1-l14-linearMSE.pth, with the MLP's input dim = tiny projection_dim (32)."""
    path = tmp_path_factory.mktemp("aesthetic")
    shutil.copytree(clip_dir, path / "clip")
    torch.manual_seed(1)
    torch.save(AestheticMLP(32).state_dict(), path / MLP_FILE)
    return str(path)


def _clip(path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(path).double().eval()


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _image_feats(model, images):
    feats = _pooled(model.get_image_features(pixel_values=clip_preprocess(images.double(), 32)))
    return feats / feats.norm(dim=-1, keepdim=True)


def _text_feats(model, path, prompts):
    from transformers import CLIPTokenizer

    enc = CLIPTokenizer.from_pretrained(path)(prompts, padding=True, truncation=True, max_length=16,
                                              return_tensors="pt")
    feats = _pooled(model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask))
    return feats / feats.norm(dim=-1, keepdim=True)


def test_aesthetic_equals_mlp_of_normalized_clip_features(aes_dir):
    reward = load_reward("aesthetic", weights=aes_dir)
    assert reward.name == "aesthetic" and reward.differentiable
    assert not any(p.requires_grad for p in reward.parameters())
    torch.manual_seed(2)
    images = torch.rand(3, 3, 32, 32)
    out = reward(images, PROMPTS)
    assert out.shape == (3,) and out.dtype == torch.float32
    with torch.no_grad():
        x = _image_feats(_clip(aes_dir + "/clip"), images)
        sd = {k: v.double() for k, v in torch.load(f"{aes_dir}/{MLP_FILE}").items()}
        for i in (0, 2, 4, 6, 7):  # linear layers only: no activations, dropout off
            x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(out.double(), x[:, 0], rtol=1e-4, atol=1e-5)
    assert out.std() > 1e-5  # different images, different scores
    reward.train()  # a frozen reward stays in eval mode (dropout off)
    torch.testing.assert_close(reward(images, PROMPTS), out)


def test_aesthetic_safetensors_mlp_and_wrong_dim(aes_dir, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(f"{aes_dir}/{MLP_FILE}")
    shutil.copytree(aes_dir + "/clip", tmp_path / "st" / "clip")
    save_file(state, tmp_path / "st" / "head.safetensors")
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(load_reward("aesthetic", str(tmp_path / "st"))(images, PROMPTS[:2]),
                               load_reward("aesthetic", aes_dir)(images, PROMPTS[:2]))
    shutil.copytree(aes_dir + "/clip", tmp_path / "bad" / "clip")
    torch.save(AestheticMLP(768).state_dict(), tmp_path / "bad" / MLP_FILE)  # ViT-L head, tiny CLIP
    with pytest.raises(ConfigError, match="projection_dim=32"):
        load_reward("aesthetic", str(tmp_path / "bad"))


def test_clip_score_and_pickscore_equal_scaled_cosines(clip_dir):
    torch.manual_seed(3)
    images = torch.rand(3, 3, 32, 32)
    model = _clip(clip_dir)
    with torch.no_grad():
        cos = (_image_feats(model, images) * _text_feats(model, clip_dir, PROMPTS)).sum(-1)
    clip, pick = load_reward("clip", clip_dir), load_reward("pickscore", clip_dir)
    assert clip.name == "clip" and pick.name == "pickscore" and clip.differentiable and pick.differentiable
    for reward, scale in ((clip, 100.0), (pick, LOGIT_SCALE)):
        out = reward(images, PROMPTS)
        assert out.shape == (3,) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), scale * cos, rtol=1e-4, atol=1e-4)
    same = images[:1].expand(2, -1, -1, -1)
    assert not torch.allclose(*clip(same, ["a cat", "a dog"]))  # the prompt matters
    long = ["a very long prompt that goes far beyond the sixteen tokens of the tiny text model"]
    assert torch.isfinite(clip(images[:1], long)).all()  # truncated, not an error


@pytest.mark.parametrize("name", ["aesthetic", "clip"])
def test_gradient_matches_finite_differences(name, aes_dir, clip_dir):
    reward = load_reward(name, aes_dir if name == "aesthetic" else clip_dir, dtype=torch.float64)
    torch.manual_seed(4)
    images = torch.rand(2, 3, 40, 48, dtype=torch.float64, requires_grad=True)  # resized and cropped to 32
    prompts = PROMPTS[:2]
    grad, = torch.autograd.grad(reward(images, prompts).sum(), images)
    assert grad.abs().max() > 0
    eps = 1e-2
    for _ in range(2):
        v = torch.randn_like(images)
        with torch.no_grad():
            fd = (reward(images + eps * v, prompts) - reward(images - eps * v, prompts)).double() / (2 * eps)
        analytic = (grad * v).flatten(1).sum(1)  # each image only moves its own reward
        torch.testing.assert_close(fd, analytic, rtol=2e-3, atol=1e-6 * max(1.0, float(analytic.abs().max())))


def test_jpeg_rewards_prefer_flat_images_and_are_black_box():
    torch.manual_seed(5)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64)
    images = torch.cat([flat, noise]).requires_grad_(True)
    comp, incomp = load_reward("jpeg_compressibility"), load_reward("jpeg_incompressibility")
    assert not comp.differentiable and not incomp.differentiable
    c, i = comp(images, ["x", "y"]), incomp(images, ["x", "y"])
    assert c.shape == (2,) and c.dtype == torch.float32 and not c.requires_grad
    assert c[0] > c[1] and i[1] > i[0]
    torch.testing.assert_close(c, -i)
    buf = io.BytesIO()  # the size in kB of the noise image saved by PIL at quality 95
    Image.fromarray((noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buf, format="JPEG", quality=95)
    assert i[1].item() == pytest.approx(buf.tell() / 1000)
    with pytest.raises(ValueError, match="prompts"):
        comp(images, ["x"])


def test_weighted_sum_is_sum_of_terms(aes_dir, clip_dir):
    torch.manual_seed(6)
    images = torch.rand(2, 3, 32, 32)
    prompts = PROMPTS[:2]
    total = load_reward("aesthetic + 0.5*clip - 2*jpeg_compressibility", f"aesthetic={aes_dir}, clip={clip_dir}")
    assert isinstance(total, WeightedSum) and not total.differentiable  # a black-box term with nonzero weight
    assert total.name == "1*aesthetic+0.5*clip-2*jpeg_compressibility"
    aes, clip = load_reward("aesthetic", aes_dir), load_reward("clip", clip_dir)
    jpeg = load_reward("jpeg_compressibility")
    parts = {"aesthetic": aes(images, prompts), "clip": clip(images, prompts),
             "jpeg_compressibility": jpeg(images, prompts)}
    out = total(images, prompts)
    assert out.shape == (2,) and out.dtype == torch.float32
    torch.testing.assert_close(out, parts["aesthetic"] + 0.5 * parts["clip"] - 2 * parts["jpeg_compressibility"])
    assert set(total.last_terms) == set(parts)
    for k, v in parts.items():
        torch.testing.assert_close(total.last_terms[k], v)

    # a zero-weight black box keeps the sum differentiable; a plain path goes to the one term needing weights
    soft = load_reward("1.0*aesthetic - 0*jpeg_compressibility", aes_dir)
    assert soft.differentiable
    x = images.clone().requires_grad_(True)
    g_soft, = torch.autograd.grad(soft(x, prompts).sum(), x)
    g_aes, = torch.autograd.grad(aes(x, prompts).sum(), x)
    torch.testing.assert_close(g_soft, g_aes)
    assert load_reward("aesthetic+0.1*clip", f"aesthetic={aes_dir},clip={clip_dir}").differentiable
    assert not isinstance(load_reward("aesthetic", aes_dir), WeightedSum)
    assert isinstance(load_reward("-aesthetic", aes_dir), WeightedSum)


def test_spec_parsing():
    assert parse_reward_spec("aesthetic+0.1*hpsv2") == [(1.0, "aesthetic"), (0.1, "hpsv2")]
    assert parse_reward_spec(" 1.0*aesthetic - 0.5 * jpeg_compressibility") == [
        (1.0, "aesthetic"), (-0.5, "jpeg_compressibility")]
    assert parse_reward_spec("-1e-3*pickscore+2.5E+1*clip") == [(-1e-3, "pickscore"), (25.0, "clip")]
    assert parse_reward_spec("pickscore-clip") == [(1.0, "pickscore"), (-1.0, "clip")]
    assert set(REWARDS) == {"aesthetic", "hpsv2", "imagereward", "pickscore", "clip", "jpeg_compressibility",
                            "jpeg_incompressibility"}


@pytest.mark.parametrize("spec, bad", [
    ("aesthetic*2", r"'aesthetic\*2'"), ("2aesthetic", "'2aesthetic'"), ("aesthetic+", "''"),
    ("aesthetic++clip", "''"), ("aesthetic clip", "'aesthetic clip'"), ("0.1**clip", r"'0\.1\*\*clip'"),
])
def test_spec_errors_name_the_term_and_grammar(spec, bad):
    with pytest.raises(ConfigError, match=rf"bad term {bad}.*TERM := \[NUMBER '\*'\] NAME"):
        parse_reward_spec(spec)


def test_spec_and_weights_errors():
    with pytest.raises(ConfigError, match="unknown reward 'aesthetics'.*'aesthetic'"):
        load_reward("aesthetics")
    with pytest.raises(ConfigError, match="twice"):
        parse_reward_spec("clip+0.5*clip")
    with pytest.raises(ConfigError, match="empty"):
        parse_reward_spec("  ")
    with pytest.raises(ConfigError, match="name=PATH"):
        parse_reward_weights("/some/dir", ["aesthetic", "clip"])
    with pytest.raises(ConfigError, match="not a term"):
        parse_reward_weights("hpsv2=/a", ["aesthetic", "clip"])
    with pytest.raises(ConfigError, match="needs no weights"):
        load_reward("jpeg_compressibility", "jpeg_compressibility=/a")
    with pytest.raises(ConfigError, match="bad reward weights entry '/b'"):
        parse_reward_weights("aesthetic=/a,/b", ["aesthetic", "clip"])
    assert parse_reward_weights("clip=/b, aesthetic=/a", ["aesthetic", "clip", "jpeg_compressibility"]) == {
        "aesthetic": "/a", "clip": "/b", "jpeg_compressibility": None}
    assert parse_reward_weights(None, ["aesthetic"]) == {"aesthetic": None}


def test_missing_weights_errors_name_path_and_layout(aes_dir, clip_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"aesthetic.*clip/.*sac\+logos\+ava1-l14-linearMSE\.pth"):
        load_reward("aesthetic")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(MissingWeightsError, match=re.escape(missing) + r".*does not exist.*clip/"):
        load_reward("aesthetic", missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match=r"no clip/ folder.*empty.*config\.json"):
        load_reward("aesthetic", str(tmp_path / "empty"))
    shutil.copytree(clip_dir, tmp_path / "no_mlp" / "clip")
    with pytest.raises(MissingWeightsError, match=r"no MLP weights.*no_mlp"):
        load_reward("aesthetic", str(tmp_path / "no_mlp"))
    with pytest.raises(MissingWeightsError, match=re.escape(missing) + ".*CLIPModel folder"):
        load_reward("clip", missing)
    with pytest.raises(MissingWeightsError, match="PickScore_v1"):
        load_reward("pickscore")
    with pytest.raises(MissingWeightsError, match=r"no config\.json"):
        load_reward("pickscore", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match=r"term 'clip'.*none were given.*name=PATH"):
        load_reward("aesthetic+clip", f"aesthetic={aes_dir}")
