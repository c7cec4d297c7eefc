"""ImageReward (THUDM): a BLIP image-text model fine-tuned on human preferences. Differentiable in the images.

score = (MLP(text_encoder(prompt, cross-attending to ViT(image))[:, 0]) - 0.16717362830052426) / 1.0333394966054072

* image: resize 224 (bicubic) + center crop, CLIP mean/std (``clip_preprocess``) -> BLIP ViT-L/16 (1024 x 24
  layers, 16 heads, LayerNorm eps 1e-6) -> all tokens [B, 197, 1024] after the final norm;
* prompt: bert-base-uncased WordPiece with BLIP's added ``[DEC]`` / ``[ENC]`` tokens, padded to 35 tokens; a BERT-base
  encoder (768 x 12 layers) with cross-attention to the image tokens in every layer; the ``[CLS]`` output feeds the
  MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations). As in the official ``ImageReward.score`` the first
  token stays ``[CLS]``; ``use_enc_token=True`` swaps in ``[ENC]`` (BLIP's image-text-matching convention).

Built on transformers' ``BlipVisionModel`` + ``BlipTextModel`` (cross-attention on); ``convert_imagereward_state_dict``
maps the original checkpoint keys. Weights layout (``PATH``)::

    PATH/
      ImageReward.pt       the checkpoint, from Hugging Face THUDM/ImageReward (github.com/THUDM/ImageReward)
      med_config.json      optional: the BERT config of the same repo (defaults to BERT-base + 2 added tokens)
      tokenizer/           bert-base-uncased tokenizer files (vocab.txt, tokenizer_config.json), from Hugging Face
                           google-bert/bert-base-uncased; [DEC] and [ENC] are added on load if absent
"""

from __future__ import annotations

import json
import os

import torch

from ...errors import ConfigError, MissingWeightsError
from .aesthetic import AestheticMLP
from .base import ImageReward, clip_preprocess, require_path
from .clip_score import quiet_transformers
from .hps import load_checkpoint

CHECKPOINT = "ImageReward.pt"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
SOURCE = "Hugging Face THUDM/ImageReward (see github.com/THUDM/ImageReward)"
TOKENIZER_SOURCE = "the tokenizer files (vocab.txt, tokenizer_config.json) of google-bert/bert-base-uncased"
LAYOUT = (f"a directory holding {CHECKPOINT}, optionally med_config.json, and tokenizer/ (bert-base-uncased: "
          f"vocab.txt)")


def imagereward_vision_config(**overrides):
    """BlipVisionConfig of BLIP's ViT-L/16 at 224 px (timm-style ViT: exact GELU, LayerNorm eps 1e-6)."""
    from transformers import BlipVisionConfig

    kw = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
    kw.update(overrides)
    return BlipVisionConfig(**kw)


def imagereward_text_config(med: dict | None, encoder_width: int):
    """BlipTextConfig (BERT with cross-attention to ``encoder_width``-dim image tokens) from BLIP's med_config dict
    (None: BERT-base with vocab 30524). med_config's own ``encoder_width`` is ignored, as in BLIP_Pretrain."""
    from transformers import BlipTextConfig

    med = dict(med or {})
    if med.get("add_cross_attention") is False:
        raise ValueError("ImageReward's text encoder needs add_cross_attention=true in med_config.json")
    return BlipTextConfig(
        vocab_size=med.get("vocab_size", 30524), hidden_size=med.get("hidden_size", 768),
        encoder_hidden_size=encoder_width, intermediate_size=med.get("intermediate_size", 3072),
        num_hidden_layers=med.get("num_hidden_layers", 12), num_attention_heads=med.get("num_attention_heads", 12),
        max_position_embeddings=med.get("max_position_embeddings", 512), hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=med.get("pad_token_id", 0), is_decoder=True, use_cache=False)


def convert_imagereward_state_dict(sd: dict) -> dict:
    """Original ImageReward checkpoint (``blip.visual_encoder.*`` timm ViT, ``blip.text_encoder.*`` BERT with
    crossattention, ``mlp.layers.*``) -> state dict of ``ImageRewardScore`` (keys ``vision.*``, ``text.*``,
    ``mlp.layers.*``). timm's fused qkv [3*D, D] is stored exactly as BlipAttention's ``qkv`` (q, k, v blocks of
    heads x head_dim), so it is copied. Unused entries (vision_proj, text_proj, position_ids) are dropped."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    vis = {"patch_embed.proj.weight": "embeddings.patch_embedding.weight",
           "patch_embed.proj.bias": "embeddings.patch_embedding.bias", "cls_token": "embeddings.class_embedding",
           "pos_embed": "embeddings.position_embedding", "norm.weight": "post_layernorm.weight",
           "norm.bias": "post_layernorm.bias"}
    block = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out = {}
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            if k in vis:
                out["vision." + vis[k]] = value
            elif k.startswith("blocks."):
                _, i, rest = k.split(".", 2)
                mod, param = rest.rsplit(".", 1)
                if mod not in block:
                    raise ValueError(f"unknown ViT key {key!r}")
                out[f"vision.encoder.layers.{i}.{block[mod]}.{param}"] = value
            else:
                raise ValueError(f"unknown ViT key {key!r}")
        elif key.startswith("blip.text_encoder."):
            k = key[len("blip.text_encoder."):]
            if not k.endswith("position_ids"):  # BERT module names are the same in BlipTextModel
                out["text." + k] = value
        elif key.startswith("mlp.layers."):
            out[key] = value
    return out


class ImageRewardScore(ImageReward):
    """forward(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32 normalized ImageReward scores."""

    name = "imagereward"
    differentiable = True

    def __init__(self, vision_config, text_config, tokenizer, use_enc_token: bool = False):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight comes from the checkpoint
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # same head: layers.{0,2,4,6,7}
        self.tokenizer, self.use_enc_token = tokenizer, use_enc_token
        self.image_size = vision_config.image_size
        self.max_length = min(MAX_TOKENS, text_config.max_position_embeddings)
        self.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
        self.freeze()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off

    def tokenize(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (input_ids [B, 35], attention_mask [B, 35]) on ``device``."""
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        ids = enc["input_ids"].to(device)
        if self.use_enc_token:
            ids[:, 0] = self.enc_token_id
        return ids, enc["attention_mask"].to(device)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        p = next(self.parameters())
        pixels = clip_preprocess(images.to(device=p.device, dtype=p.dtype), size=self.image_size)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + patches, Dv]
        ids, mask = self.tokenize(prompts, p.device)
        # encoder_attention_mask=None: every image token is attended to (the original passes all ones)
        hidden = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds).last_hidden_state
        reward = self.mlp(hidden[:, 0]).squeeze(-1)
        return ((reward - MEAN) / STD).float()


def _load_tokenizer(folder: str):
    from transformers import BertTokenizer

    if not os.path.isfile(os.path.join(folder, "vocab.txt")):
        raise MissingWeightsError(f"ImageReward reward: missing {os.path.join(folder, 'vocab.txt')}; expected "
                                  f"{LAYOUT}. Copy {TOKENIZER_SOURCE} (Hugging Face) there")
    with quiet_transformers():
        tok = BertTokenizer.from_pretrained(folder, local_files_only=True)
    added = [t for t in ("[DEC]", "[ENC]") if t not in tok.get_vocab()]
    if added:  # BLIP's init_tokenizer: bos [DEC] (id 30522), then [ENC] (id 30523)
        tok.add_tokens(added, special_tokens=True)
    return tok


def load_imagereward(path: str | None, device=None, dtype=None, vision_config=None,
                     use_enc_token: bool = False) -> ImageRewardScore:
    """The ImageReward reward from ``path`` (layout in the module docstring). ``vision_config`` overrides BLIP's
    ViT-L/16 config (tests use tiny models)."""
    path = require_path(path, "ImageReward reward", LAYOUT, SOURCE)
    if not os.path.isdir(path):
        raise MissingWeightsError(f"ImageReward reward: {path!r} is not a directory; expected {LAYOUT}")
    ckpt = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(ckpt):
        raise MissingWeightsError(f"ImageReward reward: missing {CHECKPOINT} in {path!r}; expected {LAYOUT}. "
                                  f"Download it from {SOURCE} and put it there")
    tokenizer = _load_tokenizer(os.path.join(path, "tokenizer"))
    med = None
    if os.path.isfile(os.path.join(path, "med_config.json")):
        with open(os.path.join(path, "med_config.json")) as fh:
            med = json.load(fh)
    vision_config = vision_config if vision_config is not None else imagereward_vision_config()
    text_config = imagereward_text_config(med, vision_config.hidden_size)
    if len(tokenizer) > text_config.vocab_size:
        raise ConfigError(f"ImageReward reward: the tokenizer in {path!r}/tokenizer has {len(tokenizer)} "
                                  f"tokens but the text encoder only {text_config.vocab_size}; use "
                                  f"{TOKENIZER_SOURCE}")
    model = ImageRewardScore(vision_config, text_config, tokenizer, use_enc_token)
    state = convert_imagereward_state_dict(load_checkpoint(ckpt))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"ImageReward reward: {ckpt!r} does not match the ImageReward architecture: "
                                  f"{e}") from None
    return model.to(device=device, dtype=dtype).freeze()
