"""HPSv2 and ImageReward rewards on tiny random models saved in the ORIGINAL checkpoint formats.

The references below are small plain-torch forwards of the original architectures that read the original state-dict
keys directly: open_clip's CLIP (nn.MultiheadAttention via F.multi_head_attention_forward, causal text mask, argmax
pooling over zero-padded tokens) and BLIP's timm ViT + BERT with cross-attention (BLIP med.py). The rewards are built
through the converters and the transformers modules, so agreement checks the key mapping, the q/k/v split, the
transposes, the activations, the norms' eps and the pooling."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers.initialization import no_init_weights

from sqdf.errors import MissingWeightsError
from sqdf.sd.rewards.base import clip_preprocess
from sqdf.sd.rewards.clip_score import clip_image_embeds
from sqdf.sd.rewards.hps import CHECKPOINTS, convert_open_clip_state_dict, hpsv2_config, load_hpsv2
from sqdf.sd.rewards.imagereward import (
    MEAN,
    STD,
    convert_imagereward_state_dict,
    imagereward_vision_config,
    load_imagereward,
)
from sqdf.sd.tiny import TINY_TOKENS, tiny_clip_config, write_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
HPS_PROMPTS = ["a red cat", "dog", "two blue birds", "a very long prompt that gets truncated"]
IR_PROMPTS = ["a photo of a cat", "the red dogs on the table", "blue", "a cat on a dog on a table of cats"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "blue", "the",
              "on", "table", "##s"]


def _rand(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def _ln_params(sd, prefix, dim, g):
    sd[prefix + ".weight"] = 1 + _rand(g, dim, scale=0.1)
    sd[prefix + ".bias"] = _rand(g, dim, scale=0.1)


def _linear_params(sd, prefix, out_dim, in_dim, g, scale=None):
    sd[prefix + ".weight"] = _rand(g, out_dim, in_dim, scale=scale or 1.0 / math.sqrt(in_dim))
    sd[prefix + ".bias"] = _rand(g, out_dim, scale=0.1)


def _images(g, b, h, w):
    return (0.2 + 0.6 * torch.rand(b, 3, h, w, generator=g)).to(F64)


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


# ----------------------------------------------------------------------------- HPSv2 (open_clip ViT)

def hps_tiny_config():
    cfg = tiny_clip_config(image_size=32, patch_size=8)
    cfg.vision_config.hidden_act = "gelu"  # open_clip ViT-H-14: exact GELU
    cfg.text_config.hidden_act = "gelu"
    return cfg


def random_open_clip_state_dict(cfg, seed=0) -> dict:
    """Random weights under open_clip's CLIP key names (float32)."""
    g = torch.Generator().manual_seed(seed)
    vc, tc = cfg.vision_config, cfg.text_config
    p, dv, dt = vc.patch_size, vc.hidden_size, tc.hidden_size
    sd = {"visual.conv1.weight": _rand(g, dv, 3, p, p, scale=0.3), "visual.class_embedding": _rand(g, dv),
          "visual.positional_embedding": _rand(g, (vc.image_size // p) ** 2 + 1, dv),
          "visual.proj": _rand(g, dv, cfg.projection_dim, scale=0.3),
          "token_embedding.weight": _rand(g, tc.vocab_size, dt, scale=0.5),
          "positional_embedding": _rand(g, tc.max_position_embeddings, dt),
          "text_projection": _rand(g, dt, cfg.projection_dim, scale=0.3),
          "logit_scale": torch.tensor(math.log(1 / 0.07))}
    for name, dim in (("visual.ln_pre", dv), ("visual.ln_post", dv), ("ln_final", dt)):
        _ln_params(sd, name, dim, g)
    for root, c in (("visual.transformer.resblocks", vc), ("transformer.resblocks", tc)):
        d = c.hidden_size
        for i in range(c.num_hidden_layers):
            b = f"{root}.{i}"
            _linear_params(sd, f"{b}.attn.in_proj", 3 * d, d, g, scale=0.4)
            sd[f"{b}.attn.in_proj_weight"] = sd.pop(f"{b}.attn.in_proj.weight")
            sd[f"{b}.attn.in_proj_bias"] = sd.pop(f"{b}.attn.in_proj.bias")
            _linear_params(sd, f"{b}.attn.out_proj", d, d, g)
            _ln_params(sd, f"{b}.ln_1", d, g)
            _ln_params(sd, f"{b}.ln_2", d, g)
            _linear_params(sd, f"{b}.mlp.c_fc", c.intermediate_size, d, g)
            _linear_params(sd, f"{b}.mlp.c_proj", d, c.intermediate_size, g)
    return sd


def _oc_transformer(x, sd, root, layers, heads, mask=None):
    """open_clip Transformer (ResidualAttentionBlock: pre-LN, nn.MultiheadAttention, c_fc -> GELU -> c_proj)."""
    for i in range(layers):
        b = f"{root}.{i}"
        h = _ln(x, sd, f"{b}.ln_1", 1e-5).transpose(0, 1)  # nn.MultiheadAttention: [L, B, D]
        a, _ = F.multi_head_attention_forward(
            h, h, h, h.shape[-1], heads, sd[f"{b}.attn.in_proj_weight"], sd[f"{b}.attn.in_proj_bias"], None, None,
            False, 0.0, sd[f"{b}.attn.out_proj.weight"], sd[f"{b}.attn.out_proj.bias"], training=False,
            need_weights=False, attn_mask=mask)
        x = x + a.transpose(0, 1)
        h = _ln(x, sd, f"{b}.ln_2", 1e-5)
        x = x + _lin(F.gelu(_lin(h, sd, f"{b}.mlp.c_fc")), sd, f"{b}.mlp.c_proj")
    return x


def oc_encode_image(sd, cfg, pixels):
    """open_clip VisionTransformer.forward + proj: pixels [B, 3, S, S] -> [B, projection_dim] (not normalized)."""
    vc = cfg.vision_config
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=vc.patch_size)
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre", 1e-5)
    x = _oc_transformer(x, sd, "visual.transformer.resblocks", vc.num_hidden_layers, vc.num_attention_heads)
    return _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]


def oc_encode_text(sd, cfg, tokens):
    """open_clip CLIP.encode_text: tokens [B, context] (zero padded) -> [B, projection_dim] (not normalized)."""
    tc = cfg.text_config
    n = tokens.shape[1]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:n]
    causal = torch.full((n, n), float("-inf"), dtype=x.dtype).triu_(1)
    x = _oc_transformer(x, sd, "transformer.resblocks", tc.num_hidden_layers, tc.num_attention_heads, causal)
    x = _ln(x, sd, "ln_final", 1e-5)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]


def open_clip_tokens(tokenizer, prompts, context):
    """Like open_clip's tokenizer: bos ... eot, truncated to ``context`` (eot kept last), then zero padded."""
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=context)["input_ids"]
    out = torch.zeros(len(prompts), context, dtype=torch.long)
    for row, seq in enumerate(ids):
        seq = seq[:seq.index(tokenizer.eos_token_id) + 1]
        out[row, :len(seq)] = torch.tensor(seq)
    return out


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    """PATH/HPS_v2.1_compressed.pt ({'state_dict': {'module.' + open_clip key: tensor}}) + PATH/tokenizer/."""
    path = tmp_path_factory.mktemp("hps")
    sd = random_open_clip_state_dict(hps_tiny_config())
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, path / CHECKPOINTS["v2.1"])
    write_tiny_tokenizer(str(path / "tokenizer"))
    return path, sd


def test_hpsv2_config_is_vit_h_14():
    cfg = hpsv2_config()
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size,
            v.intermediate_size) == (1280, 32, 16, 14, 224, 5120)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size, t.max_position_embeddings,
            t.vocab_size) == (1024, 24, 16, 4096, 77, 49408)
    assert cfg.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu"


def test_hps_converter_fits_real_vit_h_14_shapes():
    """Full-size open_clip ViT-H-14 shapes (meta tensors: no memory) convert onto CLIPModel(hpsv2_config())."""
    from transformers import CLIPModel

    w, tw, m = 1280, 1024, "meta"
    sd = {"visual.conv1.weight": torch.empty(w, 3, 14, 14, device=m),
          "visual.class_embedding": torch.empty(w, device=m), "visual.positional_embedding": torch.empty(16 * 16 + 1, w, device=m),
          "visual.proj": torch.empty(w, 1024, device=m), "token_embedding.weight": torch.empty(49408, tw, device=m),
          "positional_embedding": torch.empty(77, tw, device=m), "text_projection": torch.empty(tw, 1024, device=m),
          "logit_scale": torch.empty((), device=m)}
    for name, d in (("visual.ln_pre", w), ("visual.ln_post", w), ("ln_final", tw)):
        sd.update({f"{name}.weight": torch.empty(d, device=m), f"{name}.bias": torch.empty(d, device=m)})
    for root, d, n in (("visual.transformer.resblocks", w, 32), ("transformer.resblocks", tw, 24)):
        for i in range(n):
            b = f"{root}.{i}"
            shapes = {"attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,), "attn.out_proj.weight": (d, d),
                      "attn.out_proj.bias": (d,), "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,),
                      "ln_2.bias": (d,), "mlp.c_fc.weight": (4 * d, d), "mlp.c_fc.bias": (4 * d,),
                      "mlp.c_proj.weight": (d, 4 * d), "mlp.c_proj.bias": (d,)}
            sd.update({f"{b}.{k}": torch.empty(*s, device=m) for k, s in shapes.items()})
    converted = convert_open_clip_state_dict({"state_dict": sd}, hpsv2_config())
    with torch.device("meta"), no_init_weights():
        model = CLIPModel(hpsv2_config())
    target = model.state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert 0.9e9 < sum(p.numel() for p in model.parameters()) < 1.1e9  # ViT-H-14 CLIP: ~986M parameters


def test_hps_matches_open_clip_reference(hps_dir):
    path, sd = hps_dir
    cfg = hps_tiny_config()
    reward = load_hpsv2(str(path), dtype=F64, config=cfg)
    ref = {k: v.to(F64) for k, v in sd.items()}
    g = torch.Generator().manual_seed(1)
    images = _images(g, len(HPS_PROMPTS), 32, 32)

    img = oc_encode_image(ref, cfg, clip_preprocess(images, 32))
    tokens = open_clip_tokens(reward.tokenizer, HPS_PROMPTS, TINY_TOKENS)
    txt = oc_encode_text(ref, cfg, tokens)
    with torch.no_grad():
        got_img = clip_image_embeds(reward.model, images)
        got_txt = reward.text_embeds(HPS_PROMPTS)
        score = reward(images, HPS_PROMPTS)
    torch.testing.assert_close(got_img, img, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_txt, F.normalize(txt, dim=-1), rtol=1e-9, atol=1e-10)
    expected = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    torch.testing.assert_close(score, expected.float(), rtol=1e-5, atol=1e-6)
    assert score.std() > 1e-3  # not a constant: the prompts and images matter
    torch.testing.assert_close(reward.model.logit_scale.double(), ref["logit_scale"])


def test_hps_convert_rejects_foreign_keys():
    cfg = hps_tiny_config()
    sd = random_open_clip_state_dict(cfg)
    with pytest.raises(ValueError, match="does not know"):
        convert_open_clip_state_dict({**sd, "visual.attn_pool.query": torch.zeros(3)}, cfg)
    sd.pop("visual.proj")
    with pytest.raises(ValueError, match="visual.proj"):
        convert_open_clip_state_dict(sd, cfg)


def test_hps_folder_layouts_end_to_end(hps_dir, tmp_path):
    path, _ = hps_dir
    reward = load_hpsv2(str(path), config=hps_tiny_config())  # default dtype: float32
    assert reward.name == "hpsv2" and reward.differentiable
    assert not any(p.requires_grad for p in reward.parameters())
    images = torch.rand(len(HPS_PROMPTS), 3, 48, 40)
    with torch.no_grad():
        score = reward(images, HPS_PROMPTS)
    assert score.shape == (len(HPS_PROMPTS),) and score.dtype == torch.float32
    assert torch.isfinite(score).all() and (score.abs() <= 1 + 1e-5).all()

    out = tmp_path / "converted"  # the converted transformers layout loads to the same reward
    reward.model.save_pretrained(str(out))
    reward.tokenizer.save_pretrained(str(out / "tokenizer"))
    again = load_hpsv2(str(out))
    with torch.no_grad():
        torch.testing.assert_close(again(images, HPS_PROMPTS), score)


def _finite_difference_check(reward, images, prompts):
    """d/dt sum(reward(images + t v)) at t=0: autograd through the public forward (float64 graph, float32 output)
    against a central difference of the same score computed without the final float32 cast."""
    g = torch.Generator().manual_seed(7)
    direction = torch.randn(images.shape, generator=g, dtype=F64)
    x = images.clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad is not None and x.grad.dtype == F64 and x.grad.abs().sum() > 0
    analytic = (x.grad * direction).sum()
    score64 = _Float64Score(reward)
    eps = 1e-5
    with torch.no_grad():
        torch.testing.assert_close(score64(images, prompts).float(), reward(images, prompts))
        numeric = (score64(images + eps * direction, prompts).sum()
                   - score64(images - eps * direction, prompts).sum()) / (2 * eps)
    assert abs(float(analytic)) > 1e-6
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_hps_gradient_reaches_images(hps_dir):
    path, _ = hps_dir
    reward = load_hpsv2(str(path), dtype=F64, config=hps_tiny_config())
    images = _images(torch.Generator().manual_seed(3), 2, 40, 36)  # resized + cropped on the way
    _finite_difference_check(reward, images, HPS_PROMPTS[:2])


class _Float64Score(torch.nn.Module):
    """The reward's score without the final float32 cast (a float64 finite difference needs float64 values)."""

    def __init__(self, reward):
        super().__init__()
        self.reward = reward

    def forward(self, images, prompts):
        r = self.reward
        if hasattr(r, "text_embeds"):  # HPSv2 (ClipScore)
            img = clip_image_embeds(r.model, images)
            return (F.normalize(img, dim=-1) * r.text_embeds(prompts)).sum(-1) * r.scale
        pixels = clip_preprocess(images, size=r.image_size)
        ids, mask = r.tokenize(prompts, images.device)
        hidden = r.text(input_ids=ids, attention_mask=mask,
                        encoder_hidden_states=r.vision(pixel_values=pixels).last_hidden_state).last_hidden_state
        return (r.mlp(hidden[:, 0]).squeeze(-1) - MEAN) / STD


def test_hps_missing_files(tmp_path, hps_dir):
    with pytest.raises(MissingWeightsError, match="HPS_v2.1_compressed.pt"):
        load_hpsv2(str(tmp_path))
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_hpsv2(str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="reward-weights"):
        load_hpsv2(None)
    path, _ = hps_dir
    with pytest.raises(MissingWeightsError, match="HPS_v2_compressed.pt"):
        load_hpsv2(str(path), version="v2.0", config=hps_tiny_config())
    only_ckpt = tmp_path / "no_tokenizer"
    only_ckpt.mkdir()
    os.symlink(path / CHECKPOINTS["v2.1"], only_ckpt / CHECKPOINTS["v2.1"])
    with pytest.raises(MissingWeightsError, match=r"tokenizer[/\\]vocab\.json"):
        load_hpsv2(str(only_ckpt), config=hps_tiny_config())


# ----------------------------------------------------------------------------- ImageReward (BLIP)

IR_MED = {"vocab_size": len(BERT_VOCAB) + 2, "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 48, "max_position_embeddings": 40, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
          "pad_token_id": 0, "encoder_width": 768, "add_cross_attention": True, "type_vocab_size": 2}


def ir_tiny_vision():
    return imagereward_vision_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8)


def random_imagereward_state_dict(vc, med, seed=0) -> dict:
    """Random weights under the original ImageReward.pt key names (float32)."""
    g = torch.Generator().manual_seed(seed)
    dv, dt, p = vc.hidden_size, med["hidden_size"], vc.patch_size
    v, t = "blip.visual_encoder", "blip.text_encoder"
    sd = {f"{v}.cls_token": _rand(g, 1, 1, dv), f"{v}.pos_embed": _rand(g, 1, (vc.image_size // p) ** 2 + 1, dv)}
    _linear_params(sd, f"{v}.patch_embed.proj", dv, 3 * p * p, g)
    sd[f"{v}.patch_embed.proj.weight"] = sd[f"{v}.patch_embed.proj.weight"].view(dv, 3, p, p)
    for i in range(vc.num_hidden_layers):
        b = f"{v}.blocks.{i}"
        _ln_params(sd, f"{b}.norm1", dv, g)
        _linear_params(sd, f"{b}.attn.qkv", 3 * dv, dv, g, scale=0.4)
        _linear_params(sd, f"{b}.attn.proj", dv, dv, g)
        _ln_params(sd, f"{b}.norm2", dv, g)
        _linear_params(sd, f"{b}.mlp.fc1", vc.intermediate_size, dv, g)
        _linear_params(sd, f"{b}.mlp.fc2", dv, vc.intermediate_size, g)
    _ln_params(sd, f"{v}.norm", dv, g)
    sd[f"{t}.embeddings.word_embeddings.weight"] = _rand(g, med["vocab_size"], dt, scale=0.5)
    sd[f"{t}.embeddings.position_embeddings.weight"] = _rand(g, med["max_position_embeddings"], dt)
    sd[f"{t}.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    _ln_params(sd, f"{t}.embeddings.LayerNorm", dt, g)
    for i in range(med["num_hidden_layers"]):
        b = f"{t}.encoder.layer.{i}"
        for att, kv_dim in (("attention", dt), ("crossattention", dv)):
            _linear_params(sd, f"{b}.{att}.self.query", dt, dt, g, scale=0.4)
            _linear_params(sd, f"{b}.{att}.self.key", dt, kv_dim, g, scale=0.4)
            _linear_params(sd, f"{b}.{att}.self.value", dt, kv_dim, g)
            _linear_params(sd, f"{b}.{att}.output.dense", dt, dt, g)
            _ln_params(sd, f"{b}.{att}.output.LayerNorm", dt, g)
        _linear_params(sd, f"{b}.intermediate.dense", med["intermediate_size"], dt, g)
        _linear_params(sd, f"{b}.output.dense", dt, med["intermediate_size"], g)
        _ln_params(sd, f"{b}.output.LayerNorm", dt, g)
    _linear_params(sd, "blip.vision_proj", 8, dv, g)  # in the checkpoint, unused by the reward
    _linear_params(sd, "blip.text_proj", 8, dt, g)
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, dt), (128, 1024), (64, 128), (16, 64), (1, 16))):
        _linear_params(sd, f"mlp.layers.{i}", o, n, g, scale=1.0 / math.sqrt(n))
    return sd


def blip_vit(sd, vc, pixels):
    """BLIP's timm-style VisionTransformer.forward: all tokens after the final norm (eps 1e-6)."""
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=vc.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + sd[f"{v}.pos_embed"][:, :x.shape[1]]
    heads = vc.num_attention_heads
    for i in range(vc.num_hidden_layers):
        b = f"{v}.blocks.{i}"
        h = _ln(x, sd, f"{b}.norm1", 1e-6)
        bsz, n, c = h.shape
        qkv = _lin(h, sd, f"{b}.attn.qkv").reshape(bsz, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, val = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (c // heads) ** -0.5).softmax(dim=-1)
        x = x + _lin((attn @ val).transpose(1, 2).reshape(bsz, n, c), sd, f"{b}.attn.proj")
        h = _ln(x, sd, f"{b}.norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
    return _ln(x, sd, f"{v}.norm", 1e-6)


def _bert_attention(x, ctx, sd, prefix, heads, mask):
    bsz, n, d = x.shape
    hd = d // heads
    q = _lin(x, sd, f"{prefix}.self.query").view(bsz, n, heads, hd).transpose(1, 2)
    k = _lin(ctx, sd, f"{prefix}.self.key").view(bsz, ctx.shape[1], heads, hd).transpose(1, 2)
    val = _lin(ctx, sd, f"{prefix}.self.value").view(bsz, ctx.shape[1], heads, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + mask
    out = (scores.softmax(-1) @ val).transpose(1, 2).reshape(bsz, n, d)
    return _ln(_lin(out, sd, f"{prefix}.output.dense") + x, sd, f"{prefix}.output.LayerNorm", 1e-12)


def blip_bert(sd, med, ids, attention_mask, image_embeds):
    """BLIP med.py BertModel (mode 'multimodal'): self-attention, cross-attention to the image, FFN; post-LN."""
    t = "blip.text_encoder"
    x = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + sd[f"{t}.embeddings.position_embeddings.weight"][
        :ids.shape[1]]
    x = _ln(x, sd, f"{t}.embeddings.LayerNorm", 1e-12)
    ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
    image_mask = torch.zeros(1, 1, 1, image_embeds.shape[1], dtype=x.dtype)  # encoder_attention_mask = ones
    for i in range(med["num_hidden_layers"]):
        b = f"{t}.encoder.layer.{i}"
        x = _bert_attention(x, x, sd, f"{b}.attention", med["num_attention_heads"], ext)
        x = _bert_attention(x, image_embeds, sd, f"{b}.crossattention", med["num_attention_heads"], image_mask)
        h = F.gelu(_lin(x, sd, f"{b}.intermediate.dense"))
        x = _ln(_lin(h, sd, f"{b}.output.dense") + x, sd, f"{b}.output.LayerNorm", 1e-12)
    return x


def imagereward_reference(sd, vc, med, tokenizer, images, prompts):
    pixels = clip_preprocess(images, vc.image_size)
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    hidden = blip_bert(sd, med, enc["input_ids"], enc["attention_mask"], blip_vit(sd, vc, pixels))
    r = hidden[:, 0]
    for i in (0, 2, 4, 6, 7):  # dropouts (eval) in between, no activations
        r = _lin(r, sd, f"mlp.layers.{i}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    """PATH/ImageReward.pt (plain state dict, original keys) + med_config.json + tokenizer/vocab.txt."""
    path = tmp_path_factory.mktemp("imagereward")
    sd = random_imagereward_state_dict(ir_tiny_vision(), IR_MED)
    torch.save(sd, path / "ImageReward.pt")
    (path / "med_config.json").write_text(json.dumps(IR_MED))
    (path / "tokenizer").mkdir()
    (path / "tokenizer" / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    return path, sd


def test_imagereward_matches_blip_reference(ir_dir):
    path, sd = ir_dir
    vc = ir_tiny_vision()
    reward = load_imagereward(str(path), dtype=F64, vision_config=vc)
    assert reward.text.config.encoder_hidden_size == vc.hidden_size  # med_config's encoder_width is overridden
    assert len(reward.tokenizer) == len(BERT_VOCAB) + 2  # [DEC], [ENC] added as in BLIP
    ref = {k: (v.to(F64) if v.is_floating_point() else v) for k, v in sd.items()}
    images = _images(torch.Generator().manual_seed(2), len(IR_PROMPTS), 32, 32)
    with torch.no_grad():
        got_tokens = reward.vision(pixel_values=clip_preprocess(images, 32)).last_hidden_state
        score = reward(images, IR_PROMPTS)
    torch.testing.assert_close(got_tokens, blip_vit(ref, vc, clip_preprocess(images, 32)), rtol=1e-9, atol=1e-10)
    expected = imagereward_reference(ref, vc, IR_MED, reward.tokenizer, images, IR_PROMPTS)
    torch.testing.assert_close(score, expected.float(), rtol=1e-5, atol=1e-5)
    assert score.std() > 1e-3


def test_imagereward_converter_fits_real_blip_large_shapes():
    """Full-size ImageReward shapes (BLIP ViT-L/16 at 224, BERT-base + cross-attention, 30524 tokens; meta tensors)
    convert onto the default configs."""
    from transformers import BlipTextModel, BlipVisionModel

    from sqdf.sd.rewards.aesthetic import AestheticMLP
    from sqdf.sd.rewards.imagereward import imagereward_text_config

    vc = imagereward_vision_config()
    med = {**IR_MED, "vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
           "intermediate_size": 3072, "max_position_embeddings": 512}
    with torch.device("meta"), no_init_weights():
        sd = random_imagereward_state_dict(vc, med)
        vision, text = BlipVisionModel(vc), BlipTextModel(imagereward_text_config(None, 1024), add_pooling_layer=False)
        mlp = AestheticMLP(768)
    target = {**{"vision." + k: v for k, v in vision.state_dict().items()},
              **{"text." + k: v for k, v in text.state_dict().items()},
              **{"mlp." + k: v for k, v in mlp.state_dict().items()}}
    converted = convert_imagereward_state_dict(sd)
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert converted["vision.embeddings.position_embedding"].shape == (1, 197, 1024)
    assert converted["text.encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)


def test_imagereward_convert_drops_unused_and_rejects_unknown():
    vc = ir_tiny_vision()
    sd = random_imagereward_state_dict(vc, IR_MED)
    out = convert_imagereward_state_dict({"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert not any("proj" in k and k.startswith("blip") for k in out)
    assert "vision.encoder.layers.1.self_attn.qkv.weight" in out and "mlp.layers.7.bias" in out
    assert not any(k.endswith("position_ids") for k in out)
    with pytest.raises(ValueError, match="unknown ViT key"):
        convert_imagereward_state_dict({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(2)})


def test_imagereward_folder_layout_end_to_end(ir_dir):
    path, _ = ir_dir
    reward = load_imagereward(str(path), vision_config=ir_tiny_vision())
    assert reward.name == "imagereward" and reward.differentiable
    assert not any(p.requires_grad for p in reward.parameters())
    images = torch.rand(3, 3, 40, 56)
    with torch.no_grad():
        score = reward(images, IR_PROMPTS[:3])
    assert score.shape == (3,) and score.dtype == torch.float32 and torch.isfinite(score).all()
    enc_variant = load_imagereward(str(path), vision_config=ir_tiny_vision(), use_enc_token=True)
    ids, _ = enc_variant.tokenize(IR_PROMPTS[:1], "cpu")
    assert int(ids[0, 0]) == enc_variant.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        assert not torch.allclose(enc_variant(images, IR_PROMPTS[:3]), score)


def test_imagereward_gradient_reaches_images(ir_dir):
    path, _ = ir_dir
    reward = load_imagereward(str(path), dtype=F64, vision_config=ir_tiny_vision())
    images = _images(torch.Generator().manual_seed(4), 2, 36, 44)
    _finite_difference_check(reward, images, IR_PROMPTS[:2])


def test_imagereward_missing_files(tmp_path, ir_dir):
    with pytest.raises(MissingWeightsError, match="ImageReward.pt"):
        load_imagereward(str(tmp_path))
    with pytest.raises(MissingWeightsError, match="reward-weights"):
        load_imagereward(None)
    path, _ = ir_dir
    only_ckpt = tmp_path / "no_tokenizer"
    only_ckpt.mkdir()
    os.symlink(path / "ImageReward.pt", only_ckpt / "ImageReward.pt")
    with pytest.raises(MissingWeightsError, match=r"tokenizer[/\\]vocab\.txt"):
        load_imagereward(str(only_ckpt), vision_config=ir_tiny_vision())
