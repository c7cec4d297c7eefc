"""Full-size Stable Diffusion 1.5 and aesthetic-reward architectures with random weights (no download).

They have the sizes of the real models (SD1.5's UNet, VAE and CLIP ViT-L/14 text encoder; the CLIP ViT-L/14 vision
tower of the LAION aesthetic predictor), so they cost the same time and memory per call as real weights and serve
speed / memory benchmarks on machines without the checkpoints. Their outputs mean nothing. Both are written in the
folder layouts that real weights use, so ``task.model=PATH`` and ``task.reward_weights=PATH`` load them through the
same code:

- ``write_random_sd15_pipeline(PATH)``: a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/,
  text_encoder/, tokenizer/, scheduler/); about 2.1 GB in float16. The tokenizer is the character-level one of
  ``sqdf.sd.tiny`` padded to SD's 77 tokens (its ids are below the 49408-token vocabulary; prompts tokenize to
  more tokens than with CLIP's BPE, but the text encoder always runs on 77 positions, as in SD).
- ``write_random_aesthetic(PATH)``: ``clip/`` (a transformers CLIPVisionModelWithProjection folder, what
  ``sqdf.sd.rewards.aesthetic`` loads) + the MLP head file; about 1.2 GB in float32, as the OpenAI checkpoint.

Both write into a temporary folder that is renamed into place when complete, so an existing folder is complete
and is reused (same seed and dtype) instead of written again.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager

import torch

DONE = ".random_weights.json"  # written last into a completed folder: what it holds and how it was made
_VERSION = 1

# SD1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json)
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# SD's VAE (vae/config.json of the same repository)
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
# CLIP ViT-L/14's text tower (SD1.5's text_encoder/config.json); token ids are the char-level tokenizer's
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768, "bos_token_id": 84, "eos_token_id": 85, "pad_token_id": 85,
}
# SD's training noise schedule (scaled_linear betas 0.00085 .. 0.012 over 1000 steps)
SD15_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "prediction_type": "epsilon", "steps_offset": 1,
}
# CLIP ViT-L/14's vision tower with its 768-d projection (openai/clip-vit-large-patch14)
AESTHETIC_VISION = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
SD15_TOKENS = 77


def sd15_configs() -> dict[str, dict]:
    """The configs ``write_random_sd15_pipeline`` builds from: {'unet', 'vae', 'text_encoder', 'scheduler'} (copies;
    keyword arguments of UNet2DConditionModel, AutoencoderKL, CLIPTextConfig and DDPMScheduler)."""
    return json.loads(json.dumps({"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT,
                                  "scheduler": SD15_SCHEDULER}))


def aesthetic_configs() -> dict:
    """The configs ``write_random_aesthetic`` builds from: {'vision': CLIPVisionConfig kwargs, 'mlp_dim': int}."""
    return {"vision": dict(AESTHETIC_VISION), "mlp_dim": AESTHETIC_VISION["projection_dim"]}


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' info/warning logs (its note on casting with .to(dtype) and the save progress)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _existing(path: str, what: dict) -> bool:
    """True when ``path`` is a completed folder written with the same settings; clear errors otherwise."""
    marker = os.path.join(path, DONE)
    if os.path.isfile(marker):
        with open(marker) as fh:
            found = json.load(fh)
        if any(found.get(k) != v for k, v in what.items()):
            raise ValueError(f"{path!r} already holds random weights written with {found}, not {what}; pass another "
                             "path (or delete that folder)")
        return True
    if os.path.exists(path):
        raise FileExistsError(f"{path!r} exists but is not a completed random-weights folder (no {DONE}); pass "
                              "another path or delete it")
    return False


def _publish(tmp: str, path: str, what: dict) -> str:
    """Mark ``tmp`` complete and rename it to ``path`` (another process that got there first wins)."""
    with open(os.path.join(tmp, DONE), "w") as fh:
        json.dump(what, fh, indent=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, DONE)):
            raise
    return path


def _write_once(path: str, what: dict, write) -> str:
    """Reuse a completed folder at ``path`` made with the same ``what``; else ``write(tmp)`` a temporary folder and
    publish it atomically (removed again if writing fails)."""
    if _existing(path, what):
        return path
    tmp = f"{os.path.abspath(path)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        return _publish(tmp, path, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_random_sd15_pipeline(path: str, seed: int = 0, dtype: torch.dtype = torch.float16,
                               configs: dict[str, dict] | None = None) -> str:
    """A StableDiffusionPipeline folder with SD1.5's architecture and random weights (in ``dtype``) at ``path``;
    returns ``path``. Written once: an existing completed folder with the same seed and dtype is reused.
    ``configs`` replaces ``sd15_configs()`` (tests use a scaled-down copy)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import write_tiny_tokenizer

    cfg = configs or sd15_configs()
    what = {"kind": "sd15", "seed": seed, "dtype": _dtype_name(dtype), "version": _VERSION,
            "note": "random weights with Stable Diffusion 1.5's architecture: for speed and memory measurements only"}
    if configs is not None:
        what["configs"] = json.loads(json.dumps(cfg))

    def write(tmp: str) -> None:
        with torch.random.fork_rng(devices=[]), _quiet_diffusers():
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(**cfg["unet"]).to(dtype)
            vae = AutoencoderKL(**cfg["vae"]).to(dtype)
            text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).to(dtype)
        max_length = cfg["text_encoder"].get("max_position_embeddings", SD15_TOKENS)
        tokenizer = write_tiny_tokenizer(os.path.join(tmp, "_tokenizer_build"), max_length=max_length)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDPMScheduler(**cfg["scheduler"]), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        with _quiet_diffusers():
            pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(os.path.join(tmp, "_tokenizer_build"), ignore_errors=True)

    return _write_once(path, what, write)


def write_random_aesthetic(path: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                           vision_config: dict | None = None) -> str:
    """The aesthetic reward layout (``clip/``: a CLIPVisionModelWithProjection folder with CLIP ViT-L/14's vision
    config; the MLP head file, input 768) with random weights at ``path``; returns ``path``. Written once, like
    ``write_random_sd15_pipeline``. ``vision_config`` replaces the ViT-L/14 config (tests use a small one)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from .rewards.aesthetic import MLP_FILE, AestheticMLP

    vcfg = dict(vision_config or AESTHETIC_VISION)
    what = {"kind": "aesthetic", "seed": seed, "dtype": _dtype_name(dtype), "version": _VERSION,
            "note": "random weights with the aesthetic predictor's architecture (CLIP ViT-L/14 vision + MLP)"}
    if vision_config is not None:
        what["configs"] = json.loads(json.dumps(vcfg))

    def write(tmp: str) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg)).to(dtype)
            mlp = AestheticMLP(vcfg["projection_dim"])
        os.makedirs(tmp)
        clip.save_pretrained(os.path.join(tmp, "clip"))
        torch.save(mlp.state_dict(), os.path.join(tmp, MLP_FILE))

    return _write_once(path, what, write)
