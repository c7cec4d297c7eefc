"""The LAION aesthetic predictor v2 ("improved aesthetic predictor", as used by DDPO, AlignProp and SQDF).

score = MLP(normalize(CLIP ViT-L/14 image embedding)), on LAION's roughly 1-10 aesthetic scale. The MLP is linear
layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout after the first three and no activations (state-dict keys
``layers.{0,2,4,6,7}``). Differentiable in the images.

Weights layout (``PATH``)::

    PATH/
      clip/                                 transformers CLIPModel folder (config.json + weights), e.g. a copy of
                                            openai/clip-vit-large-patch14; only the vision tower is loaded
      sac+logos+ava1-l14-linearMSE.pth      the MLP (or any single *.pth / *.safetensors with the same keys)
"""

from __future__ import annotations

import glob
import os

import torch
from torch import nn

from ...errors import ConfigError, MissingWeightsError
from .base import CLIP_MEAN, CLIP_STD, ImageReward, require_path
from .clip_score import clip_image_embeds, load_clip_folder, preprocess_stats

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
SOURCE = ("github.com/christophschuhmann/improved-aesthetic-predictor (the MLP file) and openai/clip-vit-large-patch14 "
          "on Hugging Face (the CLIP folder)")
LAYOUT = (f"a directory holding clip/ (a transformers CLIP ViT-L/14 folder: config.json + model.safetensors) and "
          f"{MLP_FILE} (or one *.pth / *.safetensors file with keys layers.0/2/4/6/7)")


class AestheticMLP(nn.Module):
    """The predictor head: [B, dim] normalized CLIP embeddings -> [B, 1] scores. No activations (as trained)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
            nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticReward(ImageReward):
    """forward(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32 aesthetic scores (prompts are ignored)."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, clip_vision: nn.Module, mlp: AestheticMLP, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.clip, self.mlp = clip_vision, mlp
        self.mean, self.std = tuple(mean), tuple(std)
        self.freeze()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        emb = clip_image_embeds(self.clip, images, self.mean, self.std)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb.to(next(self.mlp.parameters()).dtype)).squeeze(-1).float()


def _find_mlp(path: str) -> str:
    if os.path.isfile(os.path.join(path, MLP_FILE)):
        return os.path.join(path, MLP_FILE)
    found = sorted(glob.glob(os.path.join(path, "*.pth")) + glob.glob(os.path.join(path, "*.safetensors")))
    if not found:
        raise MissingWeightsError(f"aesthetic reward: no MLP weights ({MLP_FILE}, or a *.pth / *.safetensors file) "
                                  f"in {path!r}; expected {LAYOUT}. Get them from {SOURCE}")
    if len(found) > 1:
        raise ConfigError(f"aesthetic reward: several candidate MLP files in {path!r}: "
                          f"{[os.path.basename(f) for f in found]}; keep one, or name it {MLP_FILE}")
    return found[0]


def load_mlp_state(file: str) -> dict[str, torch.Tensor]:
    """State dict of the MLP from a .pth (plain or with a 'state_dict' entry) or .safetensors file."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_aesthetic(path: str | None, device=None, dtype=None) -> AestheticReward:
    """The aesthetic reward from ``path`` (layout in the module docstring); MLP input dim = CLIP projection_dim."""
    from transformers import CLIPVisionModelWithProjection

    path = require_path(path, "aesthetic reward", LAYOUT, SOURCE)
    if not os.path.isdir(path):
        raise MissingWeightsError(f"aesthetic reward: {path!r} is not a directory; expected {LAYOUT}")
    clip_dir = os.path.join(path, "clip")
    if not os.path.isdir(clip_dir):
        raise MissingWeightsError(f"aesthetic reward: no clip/ folder in {path!r}; expected {LAYOUT}. "
                                  f"Get it from {SOURCE}")
    mlp_file = _find_mlp(path)
    clip = load_clip_folder(clip_dir, CLIPVisionModelWithProjection, "aesthetic reward (CLIP)", LAYOUT, SOURCE,
                            device, dtype)
    mlp = AestheticMLP(clip.config.projection_dim)
    try:
        mlp.load_state_dict(load_mlp_state(mlp_file))
    except (RuntimeError, AttributeError, TypeError) as e:
        raise ConfigError(f"aesthetic reward: {mlp_file!r} does not hold the MLP for CLIP projection_dim="
                          f"{clip.config.projection_dim} (keys layers.0/2/4/6/7 of shapes dim->1024->128->64->16->1): "
                          f"{e}") from None
    mlp = mlp.to(device=device, dtype=dtype)
    mean, std = preprocess_stats(clip_dir)
    return AestheticReward(clip, mlp, mean, std)
