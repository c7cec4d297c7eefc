"""LoRA on a diffusers denoiser through peft: add, switch, read, save and load.

The policy is the denoiser with a trainable LoRA adapter named ``policy``; the reference is the same network with
every adapter switched off, so no second copy of the weights is held. A latent-consistency LoRA can live on the
same network as a second, frozen adapter (``consistency``). Switching adapters here never changes which
parameters require gradients (peft's own ``set_adapter`` does), so the optimizer's parameters stay the same.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError

POLICY_ADAPTER = "policy"
CONSISTENCY_ADAPTER = "consistency"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def add_policy_lora(net: nn.Module, rank: int, alpha: float | None = None, targets=UNET_TARGETS) -> list[nn.Parameter]:
    """Freeze ``net`` and add a trainable LoRA adapter ``policy`` (rank ``rank``, scale alpha / rank; alpha None:
    rank, the scale diffusers assumes when it reads the file back) on the ``targets`` linear layers. The LoRA
    matrices are kept in float32 whatever the base dtype. Returns the trainable parameters."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"task.lora_rank={rank} must be >= 1 (the diffusers backend trains LoRA adapters only)")
    net.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights="gaussian",
                        target_modules=list(targets))
    net.add_adapter(config, adapter_name=POLICY_ADAPTER)
    set_active_adapters(net, [POLICY_ADAPTER])
    params = []
    for name, p in net.named_parameters():
        trainable = f".{POLICY_ADAPTER}." in name and "lora_" in name
        p.requires_grad_(trainable)
        if trainable:
            p.data = p.data.to(torch.float32)
            params.append(p)
    if not params:
        raise ConfigError(f"no LoRA layers were added: none of the target modules {list(targets)} exist in the "
                          f"{type(net).__name__}")
    return params


def _tuner_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def set_active_adapters(net: nn.Module, names: list[str] | None) -> None:
    """Make exactly ``names`` active (None: all adapters off), leaving ``requires_grad`` untouched."""
    for layer in _tuner_layers(net):
        if names is None:
            layer._disable_adapters = True
        else:
            layer._disable_adapters = False
            layer._active_adapter = [n for n in names if n in layer.lora_A] if hasattr(layer, "lora_A") else names


@contextmanager
def adapters_active(net: nn.Module, names: list[str] | None):
    """Within the block only ``names`` are active (None: none, i.e. the base model); restored afterwards."""
    layers = _tuner_layers(net)
    saved = [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        set_active_adapters(net, names)
        yield net
    finally:
        for layer, active, disabled in saved:
            layer._active_adapter, layer._disable_adapters = active, disabled


def adapter_aware_checkpointing(net: nn.Module):
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` that recomputes each block
    with the adapters that were active when it first ran. Plain checkpointing recomputes in the backward pass with
    whatever is active then, so a block first run as the reference (adapters off; SQDF's Tweedie estimate) would be
    recomputed as the policy and torch would refuse the mismatch."""
    from torch.utils.checkpoint import checkpoint

    layers = _tuner_layers(net)

    def snapshot():
        return [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]

    def restore(state):
        for layer, active, disabled in state:
            layer._active_adapter, layer._disable_adapters = active, disabled

    def func(module, *args):
        at_forward = snapshot()

        def run(*inner):
            now = snapshot()
            restore(at_forward)
            try:
                return module(*inner)
            finally:
                restore(now)

        return checkpoint(run, *args, use_reentrant=False)

    return func


def policy_lora_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The ``policy`` adapter's LoRA matrices keyed by their parameter names (for checkpoints)."""
    return {name: p.detach().clone() for name, p in net.named_parameters()
            if f".{POLICY_ADAPTER}." in name and "lora_" in name}


def load_policy_lora_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA matrices into the ``policy`` adapter; the key sets must match exactly."""
    params = dict(net.named_parameters())
    own = {n for n in params if f".{POLICY_ADAPTER}." in n and "lora_" in n}
    if set(state) != own:
        missing, extra = sorted(own - set(state))[:3], sorted(set(state) - own)[:3]
        raise ConfigError(f"the checkpoint's LoRA does not fit this model (missing {missing}, unexpected {extra}); "
                          "resume with the same task.model and task.lora_rank as the run was started with")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def diffusers_lora_layers(net: nn.Module, transformer: bool = False) -> dict[str, torch.Tensor]:
    """The ``policy`` adapter in the key format ``pipe.load_lora_weights`` reads: diffusers' UNet keys
    (``lora.down``/``lora.up``) for a UNet, peft's own keys for a transformer (as diffusers' training scripts)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(net, adapter_name=POLICY_ADAPTER)
    state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in state.items()}
    return state if transformer else convert_state_dict_to_diffusers(state)


def policy_lora_metadata(net: nn.Module) -> dict:
    """The ``policy`` adapter's peft config (rank ``r``, ``lora_alpha``, ``target_modules``, ...) as a plain dict:
    what diffusers needs to rebuild the adapter at its trained scale alpha / rank instead of assuming alpha = rank."""
    config = net.peft_config[POLICY_ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(pipeline_class, net: nn.Module, directory: str, transformer: bool = False) -> str:
    """Write the ``policy`` adapter to ``directory/pytorch_lora_weights.safetensors`` with the pipeline class's
    own ``save_lora_weights`` (so ``pipe.load_lora_weights(directory)`` reads it), with the adapter's metadata
    (rank, alpha, target modules) in the file's header, so the loaded adapter has the trained scale alpha / rank
    whatever alpha was; returns the file path."""
    import os

    layers = diffusers_lora_layers(net, transformer)
    prefix = "transformer" if transformer else "unet"
    tmp = f"{directory}.tmp{os.getpid()}"
    pipeline_class.save_lora_weights(tmp, **{f"{prefix}_lora_layers": layers,
                                             f"{prefix}_lora_adapter_metadata": policy_lora_metadata(net)},
                                     safe_serialization=True)
    if os.path.isdir(directory):
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return os.path.join(directory, "pytorch_lora_weights.safetensors")
