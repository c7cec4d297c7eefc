"""Loading a diffusers pipeline from a local folder (never from a hub), with clear errors.

A pipeline folder is what ``pipe.save_pretrained(DIR)`` writes (``model_index.json`` plus one folder per
component), e.g. a local copy of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 or
stabilityai/stable-diffusion-3-medium-diffusers. ``--tiny`` models are written in the same layout first.
"""

from __future__ import annotations

import json
import os

import torch

from ..errors import ConfigError, MissingWeightsError

PIPELINE_CLASSES = {  # model_index.json's _class_name -> backend kind
    "StableDiffusionPipeline": "sd15",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SOURCES = {"sd15": "a local copy of runwayml/stable-diffusion-v1-5 (or any SD1.x/2.x diffusers folder)",
           "sdxl": "a local copy of stabilityai/stable-diffusion-xl-base-1.0",
           "sd3": "a local copy of stabilityai/stable-diffusion-3-medium-diffusers (text_encoder_3 may be left out)"}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"task.model_dtype={name!r} must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def pipeline_kind(path: str) -> str:
    """'sd15', 'sdxl' or 'sd3' from the folder's model_index.json; clear errors for anything else."""
    path = os.path.expanduser(path)
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise MissingWeightsError(f"task.model={path!r} does not exist; pass --model DIR with a diffusers pipeline "
                                  "folder (what pipe.save_pretrained(DIR) writes), or --tiny for random tiny models")
    if not os.path.exists(index):
        raise MissingWeightsError(f"task.model={path!r} has no model_index.json, so it is not a diffusers pipeline "
                                  "folder; point --model at the folder that holds model_index.json, unet/ (or "
                                  "transformer/), vae/, text_encoder/ and tokenizer/")
    with open(index) as fh:
        name = json.load(fh).get("_class_name")
    if name not in PIPELINE_CLASSES:
        raise ConfigError(f"task.model={path!r} holds a {name}; the backend supports {sorted(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[name]


def load_pipeline(path: str, expected_kind: str | None = None, dtype: torch.dtype = torch.float32):
    """The pipeline in ``path`` with frozen components in ``dtype`` (the VAE stays float32 unless dtype is bf16,
    since fp16 SD VAEs overflow). Checks the kind against ``expected_kind`` when given."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = os.path.expanduser(path)
    kind = pipeline_kind(path)
    if expected_kind is not None and kind != expected_kind:
        raise ConfigError(f"task.model={path!r} is a {kind} pipeline but this task expects {expected_kind}: "
                          f"use the {kind} preset, or pass {SOURCES[expected_kind]}")
    cls = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[kind]
    kwargs: dict = {"local_files_only": True, "torch_dtype": dtype}
    if kind == "sd15":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if kind == "sd3" and not os.path.isdir(os.path.join(path, "text_encoder_3")):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)  # T5 left out: its embeddings become zeros
    try:
        pipe = cls.from_pretrained(path, **kwargs)
    except (OSError, EnvironmentError) as exc:
        raise MissingWeightsError(f"could not load the {kind} pipeline from {path!r}: {exc}. The folder needs "
                                  f"every component listed in its model_index.json ({SOURCES[kind]})") from exc
    if dtype == torch.float16:
        pipe.vae.to(torch.float32)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, kind


def tiny_pipeline_path(kind: str, cache_dir: str | None = None) -> str:
    """A tiny random pipeline of ``kind`` written once into a cache folder (default: ~/.cache/sqdf/tiny)."""
    from .tiny import write_tiny_pipeline

    root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "sqdf", "tiny")
    path = os.path.join(root, f"{kind}-v1")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        tmp = f"{path}.tmp{os.getpid()}"
        write_tiny_pipeline(kind, tmp)
        os.makedirs(root, exist_ok=True)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return path
