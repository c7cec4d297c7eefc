"""CLIP score and PickScore: scaled cosine similarity of CLIP image and text embeddings.

* ``clip``: ``100 * cos(image_embed, text_embed)`` with any transformers ``CLIPModel`` folder (e.g. a local copy of
  openai/clip-vit-large-patch14) that also holds its tokenizer files.
* ``pickscore``: ``logit_scale.exp() * cos(...)`` with a local copy of yuvalkirstain/PickScore_v1 (a transformers
  ``CLIPModel`` folder; put the tokenizer files, e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K, in the same folder).

Both are differentiable in the images (preprocessing is ``clip_preprocess``); the text side runs without a graph.
Prompts are truncated to the tokenizer's ``model_max_length`` (and the text model's position count).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

from ...errors import MissingWeightsError
from .base import CLIP_MEAN, CLIP_STD, ImageReward, clip_preprocess, require_path

CLIP_LAYOUT = ("a transformers CLIPModel folder: config.json, model.safetensors (or pytorch_model.bin) and the "
               "tokenizer files (tokenizer_config.json, vocab.json, merges.txt)")


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars (e.g. unused text weights when loading only the
    vision tower)."""
    from transformers.utils import logging as hf_logging

    before, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bars:
            hf_logging.enable_progress_bar()


def load_clip_folder(path: str, cls, what: str, expected: str, source: str, device=None, dtype=None):
    """``cls.from_pretrained(path)`` from local files only, frozen, moved to device/dtype; a folder without a
    config or weights raises MissingWeightsError naming ``expected`` and ``source``."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingWeightsError(f"{what}: no config.json in {path!r}; expected {expected}. Get it from {source}")
    try:
        with quiet_transformers():
            model = cls.from_pretrained(path, local_files_only=True)
    except OSError as e:
        raise MissingWeightsError(f"{what}: could not load weights from {path!r} ({e}); expected {expected}. "
                                  f"Get it from {source}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(path: str, what: str, source: str):
    """The tokenizer saved in the model folder ``path``."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise MissingWeightsError(f"{what}: no usable tokenizer in {path!r} ({e}); expected {CLIP_LAYOUT}. "
                                  f"Copy the tokenizer files of {source} into that folder") from None


def preprocess_stats(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the folder's preprocessor_config.json if there is one, else CLIP's."""
    cfg = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as fh:
            data = json.load(fh)
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def clip_image_embeds(model: nn.Module, images: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Projected CLIP image embeddings (not normalized). ``model``: a CLIPModel or CLIPVisionModelWithProjection.
    images [B, 3, H, W] in [0, 1] -> [B, projection_dim] in the model's dtype."""
    p = next(model.parameters())
    cfg = getattr(model.config, "vision_config", model.config)
    pixels = clip_preprocess(images.to(device=p.device, dtype=p.dtype), size=cfg.image_size, mean=mean, std=std)
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


class ClipScore(ImageReward):
    """``scale * cos(image_embed, text_embed)``; ``scale`` is a number (CLIP score: 100) or None for the model's
    ``logit_scale.exp()`` (PickScore). forward(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32."""

    differentiable = True

    def __init__(self, model: nn.Module, tokenizer, scale: float | None, name: str, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.tokenizer, self.scale, self.name = model, tokenizer, scale, name
        self.mean, self.std = tuple(mean), tuple(std)
        limit = getattr(model.config.text_config, "max_position_embeddings", None) or tokenizer.model_max_length
        self.max_length = int(min(tokenizer.model_max_length, limit))
        self.freeze()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> L2-normalized text embeddings [B, projection_dim]."""
        device = next(self.model.parameters()).device
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        out = self.model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        emb = self.model.text_projection(out.pooler_output)
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        img = clip_image_embeds(self.model, images, self.mean, self.std)
        img = img / img.norm(dim=-1, keepdim=True)
        cos = (img * self.text_embeds(prompts)).sum(-1)
        scale = self.model.logit_scale.exp() if self.scale is None else self.scale
        return (scale * cos).float()


def _load(path, what, source, scale, name, device, dtype) -> ClipScore:
    from transformers import CLIPModel

    path = require_path(path, what, CLIP_LAYOUT, source)
    model = load_clip_folder(path, CLIPModel, what, CLIP_LAYOUT, source, device, dtype)
    mean, std = preprocess_stats(path)
    return ClipScore(model, load_tokenizer(path, what, source), scale, name, mean, std)


def load_clip_score(path: str | None, device=None, dtype=None) -> ClipScore:
    """CLIP score reward (100 * cosine) from a local CLIPModel folder with its tokenizer."""
    return _load(path, "CLIP score reward", "a CLIP checkpoint such as openai/clip-vit-large-patch14 (Hugging Face)",
                 100.0, "clip", device, dtype)


def load_pickscore(path: str | None, device=None, dtype=None) -> ClipScore:
    """PickScore reward (logit_scale.exp() * cosine) from a local copy of yuvalkirstain/PickScore_v1."""
    return _load(path, "PickScore reward", "yuvalkirstain/PickScore_v1 (model) and "
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer) on Hugging Face", None, "pickscore", device, dtype)
