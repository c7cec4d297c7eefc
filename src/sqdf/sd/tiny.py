"""Tiny, randomly initialized stand-ins for the real model families, built from configs (no download).

They run every code path of the diffusers backend and the reward zoo on a CPU in seconds: a character-level
CLIP tokenizer, CLIP text / vision models, an SD1.5-style UNet + VAE, an SDXL-style UNet with two text encoders and
added conditions, and an SD3-style MMDiT transformer. ``write_tiny_pipeline(kind, dir)`` saves a whole pipeline in
the diffusers folder layout, so that the tiny models load through exactly the code that loads real weights.
"""

from __future__ import annotations

import json
import os

import torch

TINY_TEXT_DIM = 32  # hidden size of each tiny CLIP text encoder
TINY_TOKENS = 16  # max prompt length in tokens
TINY_IMAGE = 32  # pixels per side of decoded images (latents are 8 x 8: the tiny VAE downsamples by 4)
KINDS = ("sd15", "sdxl", "sd3")


def write_tiny_tokenizer(path: str, max_length: int = TINY_TOKENS):
    """A character-level CLIPTokenizer (a-z, digits, punctuation; no merges) saved to ``path``; returns it."""
    from transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    raw = os.path.join(path, "_raw")
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(raw, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(raw, "vocab.json"), os.path.join(raw, "merges.txt"),
                        pad_token="<|endoftext|>", model_max_length=max_length)
    tok.save_pretrained(path)
    return CLIPTokenizer.from_pretrained(path)


def tiny_clip_text_config(projection_dim: int = TINY_TEXT_DIM):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=86, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=TINY_TOKENS, projection_dim=projection_dim,
                          bos_token_id=84, eos_token_id=85, pad_token_id=85)


def tiny_clip_config(image_size: int = 32, patch_size: int = 8):
    """A CLIPConfig (text + vision + projections) of the tiny size, for CLIP-based rewards."""
    from transformers import CLIPConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=TINY_TEXT_DIM)
    return CLIPConfig(text_config=tiny_clip_text_config().to_dict(), vision_config=vision.to_dict(),
                      projection_dim=TINY_TEXT_DIM)


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=TINY_IMAGE)


def tiny_unet(cross_attention_dim: int = TINY_TEXT_DIM, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    kwargs = {}
    if sdxl:  # added conditions: pooled text embedding of encoder 2 + 6 micro-conditioning numbers
        kwargs = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=TINY_TEXT_DIM + 6 * 8)
    return UNet2DConditionModel(
        sample_size=TINY_IMAGE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, **kwargs)


def tiny_sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=TINY_IMAGE // 4, patch_size=2, in_channels=4, out_channels=4,
                                 num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                 joint_attention_dim=2 * TINY_TEXT_DIM, caption_projection_dim=32,
                                 pooled_projection_dim=2 * TINY_TEXT_DIM, pos_embed_max_size=16)


def write_tiny_pipeline(kind: str, path: str, seed: int = 0) -> str:
    """Save a tiny random pipeline of ``kind`` ('sd15', 'sdxl' or 'sd3') in diffusers' folder layout at ``path``
    (model_index.json + one folder per component); returns ``path``. Same seed, same weights."""
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in KINDS:
        raise ValueError(f"tiny pipeline kind={kind!r} must be one of {KINDS}")
    torch.manual_seed(seed)
    tok_dir = os.path.join(path, "_tokenizer_build")
    tokenizer = write_tiny_tokenizer(tok_dir)
    vae = tiny_vae()
    if kind == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(tiny_clip_text_config()), tokenizer=tokenizer, unet=tiny_unet(),
            scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    num_train_timesteps=1000, clip_sample=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(tiny_clip_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config()), tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=tiny_unet(2 * TINY_TEXT_DIM, sdxl=True),
            scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    num_train_timesteps=1000, clip_sample=False, steps_offset=1))
    else:
        pipe = StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae, text_encoder=CLIPTextModelWithProjection(tiny_clip_text_config()), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config()), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path, safe_serialization=True)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    return path


def write_tiny_clip_folder(path: str, seed: int = 0) -> str:
    """A tiny random transformers CLIPModel folder with its tokenizer (the CLIP score / PickScore / converted HPSv2
    layout); returns ``path``."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    CLIPModel(tiny_clip_config()).save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def write_tiny_aesthetic(path: str, seed: int = 0) -> str:
    """The aesthetic reward layout (``clip/`` + MLP head file) with tiny random weights; returns ``path``."""
    from .rewards.aesthetic import MLP_FILE, AestheticMLP

    write_tiny_clip_folder(os.path.join(path, "clip"), seed)
    torch.manual_seed(seed + 1)
    torch.save(AestheticMLP(TINY_TEXT_DIM).state_dict(), os.path.join(path, MLP_FILE))
    return path


TINY_REWARD_WRITERS = {"aesthetic": write_tiny_aesthetic, "clip": write_tiny_clip_folder,
                       "pickscore": write_tiny_clip_folder, "hpsv2": write_tiny_clip_folder}


def write_tiny_reward_weights(spec: str, cache_dir: str | None = None) -> str | None:
    """Tiny random weights for every term of a reward spec that needs weights, written once into a cache folder;
    returns the ``reward_weights`` string for ``load_reward`` (None when no term needs weights)."""
    from ..errors import ConfigError
    from .rewards import NO_WEIGHTS, parse_reward_spec

    root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sqdf", "tiny", "rewards-v1")
    entries = []
    for _, name in parse_reward_spec(spec):
        if name in NO_WEIGHTS:
            continue
        if name not in TINY_REWARD_WRITERS:
            raise ConfigError(f"--tiny has no random stand-in for the {name} reward; pass --reward-weights, or use "
                              f"one of {sorted(TINY_REWARD_WRITERS)}")
        path = os.path.join(root, name)
        if not os.path.exists(os.path.join(path, ".done")):
            TINY_REWARD_WRITERS[name](path)
            open(os.path.join(path, ".done"), "w").close()
        entries.append(f"{name}={path}")
    if not entries:
        return None
    return entries[0].split("=", 1)[1] if len(entries) == 1 else ",".join(entries)


def write_tiny_lcm_lora(path: str, seed: int = 0, rank: int = 4) -> str:
    """A random LCM-LoRA for the tiny sd15 UNet in the diffusers LoRA file format; returns ``path``."""
    from diffusers import StableDiffusionPipeline

    from .adapters import add_policy_lora, diffusers_lora_layers

    torch.manual_seed(seed)
    unet = tiny_unet()
    add_policy_lora(unet, rank)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=diffusers_lora_layers(unet))
    return path


def write_tiny_lcm_unet(path: str, seed: int = 0) -> str:
    """A random w-conditioned LCM UNet folder (time_cond_proj_dim 16) of the tiny sd15 family; returns ``path``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(tiny_unet().config)
    config["time_cond_proj_dim"] = 16
    UNet2DConditionModel.from_config(config).save_pretrained(path)
    return path
