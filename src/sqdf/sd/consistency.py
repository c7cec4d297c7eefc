"""SQDF's consistency estimator for Stable Diffusion: a latent consistency model (LCM) loaded from a local path.

``task.consistency_path`` is either a whole LCM UNet folder (``config.json`` + weights, or a pipeline folder with
``unet/``; e.g. a local copy of SimianLuo/LCM_Dreamshaper_v7) or an LCM-LoRA (a folder or file holding
``pytorch_lora_weights.safetensors``, e.g. latent-consistency/lcm-lora-sdv1-5 or lcm-lora-sdxl). An LCM-LoRA is
loaded as a second, frozen adapter on the policy's own network, so no second UNet is held in memory.
"""

from __future__ import annotations

import os

from ..errors import ConfigError, MissingWeightsError
from .adapters import CONSISTENCY_ADAPTER, POLICY_ADAPTER, set_active_adapters
from .denoisers import LatentConsistencyModel

SOURCE = ("an LCM-LoRA (latent-consistency/lcm-lora-sdv1-5 or lcm-lora-sdxl: pytorch_lora_weights.safetensors) or "
          "an LCM UNet folder (e.g. SimianLuo/LCM_Dreamshaper_v7/unet: config.json + diffusion_pytorch_model."
          "safetensors)")


def _unet_folder(path: str) -> str | None:
    for cand in (path, os.path.join(path, "unet")):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    return None


def _lora_file(path: str) -> str | None:
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return path
    cand = os.path.join(path, "pytorch_lora_weights.safetensors")
    return cand if os.path.isfile(cand) else None


def load_consistency_model(task, path: str | None) -> LatentConsistencyModel:
    """The frozen LCM f(x, t, cond) -> x0 for a DiffusersTask whose policy network is already built."""
    from diffusers import UNet2DConditionModel

    if path is None:
        raise ConfigError(f"method.estimator=consistency on {task.name} needs task.consistency_path: {SOURCE}; or "
                          "use method.estimator=tweedie")
    if task.denoiser is None:
        raise ConfigError("build the policy (task.build_reference / build_policy_model) before the consistency model")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise MissingWeightsError(f"task.consistency_path={path!r} does not exist; expected {SOURCE}")
    schedule_abar = task._alphas_cumprod
    if schedule_abar is None:
        raise ConfigError("the consistency estimator needs a VP (DDPM) schedule; sd3 flow models have no LCM here")
    net = task.denoiser.net
    unet_dir = _unet_folder(path)
    if unet_dir is not None:
        dtype = next(p for p in net.parameters() if not p.requires_grad).dtype
        lcm = UNet2DConditionModel.from_pretrained(unet_dir, local_files_only=True, torch_dtype=dtype)
        return LatentConsistencyModel(task.denoiser, schedule_abar, net=lcm,
                                      guidance_scale=task.config.consistency_guidance)
    lora = _lora_file(path)
    if lora is None:
        raise MissingWeightsError(f"task.consistency_path={path!r} holds neither a UNet config.json nor "
                                  f"pytorch_lora_weights.safetensors; expected {SOURCE}")
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    task.pipe.load_lora_weights(os.path.dirname(lora), weight_name=os.path.basename(lora),
                                adapter_name=CONSISTENCY_ADAPTER)
    set_active_adapters(net, [POLICY_ADAPTER])  # loading activates the new adapter; the policy's stays the one on
    for name, p in net.named_parameters():  # and only the policy LoRA trains
        p.requires_grad_(name in trainable)
    return LatentConsistencyModel(task.denoiser, schedule_abar, net=None)
