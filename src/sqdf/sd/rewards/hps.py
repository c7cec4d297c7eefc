"""HPSv2 / HPSv2.1 human-preference score: ``cos(image_embed, text_embed)`` of a CLIP ViT-H-14 fine-tuned on human
preferences (typically about 0.25-0.35). Differentiable in the images (``clip_preprocess``, CLIP mean/std).

The official checkpoints are open_clip state dicts; ``convert_open_clip_state_dict`` maps them onto a transformers
``CLIPModel`` with ``hpsv2_config()`` (ViT-H-14: exact GELU, not quick_gelu). Weights layout (``PATH``), either::

    PATH/
      HPS_v2.1_compressed.pt     (or HPS_v2_compressed.pt) from Hugging Face xswu/HPSv2 (github.com/tgxs002/HPSv2);
                                 with both present v2.1 is used unless ``version='v2.0'``
      tokenizer/                 CLIP BPE tokenizer files: vocab.json + merges.txt (+ tokenizer_config.json,
                                 special_tokens_map.json), e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K or
                                 openai/clip-vit-large-patch14 (the same BPE vocabulary as open_clip's tokenizer)

or an already converted transformers folder: ``PATH/config.json`` + ``model.safetensors`` (or
``pytorch_model.bin``) with the tokenizer files in ``PATH`` or ``PATH/tokenizer/``. Converting once and saving
(``load_hpsv2(PATH).model.save_pretrained(OUT)`` plus the tokenizer files) makes later loads faster.
"""

from __future__ import annotations

import os
import pickle

import torch

from ...errors import ConfigError, MissingWeightsError
from .base import require_path
from .clip_score import ClipScore, load_clip_folder, quiet_transformers

CHECKPOINTS = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt"}
SOURCE = "Hugging Face xswu/HPSv2 (see github.com/tgxs002/HPSv2)"
TOKENIZER_SOURCE = ("the tokenizer files (vocab.json, merges.txt) of laion/CLIP-ViT-H-14-laion2B-s32B-b79K or "
                    "openai/clip-vit-large-patch14 on Hugging Face")
LAYOUT = ("a directory holding HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) and tokenizer/ (CLIP BPE tokenizer: "
          "vocab.json + merges.txt), or a converted transformers CLIPModel folder (config.json + model.safetensors "
          "+ tokenizer files)")


def hpsv2_config():
    """The transformers CLIPConfig of open_clip ViT-H-14 (vision 1280 x 32 layers, text 1024 x 24, projection 1024)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu",
                              layer_norm_eps=1e-5)
    text = CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                          num_attention_heads=16, max_position_embeddings=77, projection_dim=1024, hidden_act="gelu",
                          layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=1024)


def _blocks(src: str, dst: str, n: int) -> list[tuple[str, str, str]]:
    """(source key, target key, op) for ``n`` open_clip residual blocks under ``src`` -> CLIP encoder layers."""
    out = []
    for i in range(n):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        out += [(f"{s}.attn.in_proj_weight", f"{d}.self_attn.{{}}_proj.weight", "qkv"),
                (f"{s}.attn.in_proj_bias", f"{d}.self_attn.{{}}_proj.bias", "qkv")]
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out += [(f"{s}.{a}.weight", f"{d}.{b}.weight", "copy"), (f"{s}.{a}.bias", f"{d}.{b}.bias", "copy")]
    return out


def convert_open_clip_state_dict(sd: dict, config) -> dict:
    """open_clip CLIP state dict (optionally under 'state_dict', keys optionally prefixed 'module.') -> transformers
    ``CLIPModel`` state dict for ``config``. Splits ``in_proj`` into q/k/v, transposes the projections
    (open_clip computes ``x @ proj``). Raises ValueError on missing or unused keys."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    v, t = "vision_model", "text_model"
    plan = [("visual.conv1.weight", f"{v}.embeddings.patch_embedding.weight", "copy"),
            ("visual.class_embedding", f"{v}.embeddings.class_embedding", "copy"),
            ("visual.positional_embedding", f"{v}.embeddings.position_embedding.weight", "copy"),
            ("visual.proj", "visual_projection.weight", "transpose"),
            ("token_embedding.weight", f"{t}.embeddings.token_embedding.weight", "copy"),
            ("positional_embedding", f"{t}.embeddings.position_embedding.weight", "copy"),
            ("text_projection", "text_projection.weight", "transpose"),
            ("logit_scale", "logit_scale", "copy")]
    for a, b in (("visual.ln_pre", f"{v}.pre_layrnorm"), ("visual.ln_post", f"{v}.post_layernorm"),
                 ("ln_final", f"{t}.final_layer_norm")):
        plan += [(f"{a}.weight", f"{b}.weight", "copy"), (f"{a}.bias", f"{b}.bias", "copy")]
    plan += _blocks("visual.transformer.resblocks", f"{v}.encoder.layers", config.vision_config.num_hidden_layers)
    plan += _blocks("transformer.resblocks", f"{t}.encoder.layers", config.text_config.num_hidden_layers)
    missing = [s for s, _, _ in plan if s not in sd]
    if missing:
        raise ValueError(f"not an open_clip ViT state dict for this config: {len(missing)} keys missing, e.g. "
                         f"{missing[:5]}")
    used = {s for s, _, _ in plan} | {"attn_mask", "visual.attn_mask"}  # buffers some open_clip versions save
    unused = sorted(k for k in sd if k not in used)
    if unused:
        raise ValueError(f"open_clip state dict has {len(unused)} keys this converter does not know (a different "
                         f"architecture?), e.g. {unused[:5]}")
    out = {}
    for src, dst, op in plan:
        w = sd[src]
        if op == "qkv":
            for name, part in zip("qkv", w.chunk(3, dim=0)):
                out[dst.format(name)] = part
        elif op == "transpose":
            out[dst] = w.t().contiguous()
        else:
            out[dst] = w
    return out


def load_checkpoint(file: str) -> dict:
    """torch.load on CPU; tensors-only unpickling first, full unpickling for checkpoints that need it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # older checkpoints pickle extra objects next to the tensors
        return torch.load(file, map_location="cpu", weights_only=False)


def _load_tokenizer(folder: str, what: str):
    from transformers import CLIPTokenizer

    has_bpe = all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt"))
    if not (has_bpe or os.path.isfile(os.path.join(folder, "tokenizer.json"))):
        raise MissingWeightsError(
            f"{what}: no CLIP tokenizer in {folder!r} (missing {os.path.join(folder, 'vocab.json')} and "
            f"{os.path.join(folder, 'merges.txt')}); expected {LAYOUT}. Copy {TOKENIZER_SOURCE} there")
    with quiet_transformers():
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _find_checkpoint(path: str, version: str | None) -> str | None:
    if version is not None:
        key = {"v2": "v2.0", "2": "v2.0", "2.0": "v2.0", "2.1": "v2.1"}.get(str(version), str(version))
        if key not in CHECKPOINTS:
            raise ConfigError(f"HPS version {version!r} must be one of {sorted(CHECKPOINTS)}")
        return os.path.join(path, CHECKPOINTS[key])
    for name in CHECKPOINTS.values():
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def load_hpsv2(path: str | None, device=None, dtype=None, version: str | None = None, config=None) -> ClipScore:
    """The HPSv2 reward from ``path`` (layouts in the module docstring): forward(images [B, 3, H, W] in [0, 1],
    prompts) -> [B] float32 cosine scores. ``config`` overrides ``hpsv2_config()`` for open_clip checkpoints (tests
    use tiny models); ``version`` ('v2.0' / 'v2.1') picks the checkpoint file when both are present."""
    from transformers import CLIPModel

    what = "HPSv2 reward"
    path = require_path(path, what, LAYOUT, SOURCE)
    if not os.path.isdir(path):
        raise MissingWeightsError(f"{what}: {path!r} is not a directory; expected {LAYOUT}")
    if os.path.isfile(os.path.join(path, "config.json")) and version is None:
        model = load_clip_folder(path, CLIPModel, what, LAYOUT, SOURCE, device, dtype)
        sub = os.path.join(path, "tokenizer")
        tokenizer = _load_tokenizer(sub if os.path.isdir(sub) else path, what)
    else:
        ckpt = _find_checkpoint(path, version)
        if ckpt is None or not os.path.isfile(ckpt):
            name = os.path.basename(ckpt) if ckpt else f"{CHECKPOINTS['v2.1']} (or {CHECKPOINTS['v2.0']})"
            raise MissingWeightsError(f"{what}: missing {name} in {path!r}; expected {LAYOUT}. Download it from "
                                      f"{SOURCE} and put it there")
        tokenizer = _load_tokenizer(os.path.join(path, "tokenizer"), what)
        config = config if config is not None else hpsv2_config()
        try:
            state = convert_open_clip_state_dict(load_checkpoint(ckpt), config)
        except ValueError as e:
            raise ConfigError(f"{what}: {ckpt!r} is not an HPSv2 (open_clip ViT-H-14) checkpoint: {e}") from None
        from transformers.initialization import no_init_weights

        with no_init_weights():
            model = CLIPModel(config)
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        except RuntimeError as e:  # shapes differ from the config
            raise ConfigError(f"{what}: {ckpt!r} does not fit the CLIP config (ViT-H-14 for HPSv2): {e}") from None
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipScore(model, tokenizer, scale=1.0, name="hpsv2")
