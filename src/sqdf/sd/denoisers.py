"""Diffusers denoisers behind the policy's ``model(x, t, cond) -> prediction`` interface.

States are latents ``[B, C, h, w]`` (float32); ``cond`` is a long tensor ``[B]`` of indices into the task's prompt
list. The wrapper looks up (and caches) the text embeddings of those prompts, runs classifier-free guidance with
both branches in one batch, casts to the network's dtype and returns the guided prediction in float32. The same
wrapper serves the policy (LoRA adapter on) and the reference (adapters off): see ``disable_adapter``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import ConfigError
from .adapters import CONSISTENCY_ADAPTER, adapters_active, load_policy_lora_state_dict, policy_lora_state_dict


class PromptEmbeddings:
    """Text embeddings of a fixed prompt list, computed on first use with the pipeline's ``encode_prompt`` (no
    gradients) and cached per prompt index on the device; the negative ("") embedding is the pipeline's own."""

    def __init__(self, pipe, kind: str, prompts: list[str], max_sequence_length: int = 256):
        self.pipe, self.kind, self.prompts = pipe, kind, list(prompts)
        self.max_sequence_length = max_sequence_length
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._negative: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _encode(self, texts: list[str], device) -> tuple:
        p = self.pipe
        with torch.no_grad():
            if self.kind == "sd15":
                emb, neg = p.encode_prompt(texts, device, 1, True)
                return emb, neg, None, None
            if self.kind == "sdxl":
                emb, neg, pooled, neg_pooled = p.encode_prompt(texts, device=device, do_classifier_free_guidance=True)
                return emb, neg, pooled, neg_pooled
            emb, neg, pooled, neg_pooled = p.encode_prompt(texts, None, None, device=device,
                                                           do_classifier_free_guidance=True,
                                                           max_sequence_length=self.max_sequence_length)
            return emb, neg, pooled, neg_pooled

    def get(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings [B, L, D], pooled [B, P] or None) for prompt indices idx [B]."""
        ids = [int(i) for i in idx.reshape(-1).tolist()]
        bad = [i for i in ids if not 0 <= i < len(self.prompts)]
        if bad:
            raise ConfigError(f"prompt indices {bad[:5]} are outside the {len(self.prompts)} prompts of the task")
        todo = sorted({i for i in ids if i not in self._cache})
        for start in range(0, len(todo), 32):
            chunk = todo[start:start + 32]
            emb, neg, pooled, neg_pooled = self._encode([self.prompts[i] for i in chunk], device)
            for j, i in enumerate(chunk):
                self._cache[i] = (emb[j], None if pooled is None else pooled[j])
            if self._negative is None:
                self._negative = (neg[0], None if neg_pooled is None else neg_pooled[0])
        emb = torch.stack([self._cache[i][0] for i in ids]).to(device)
        pooled = None if self._cache[ids[0]][1] is None else torch.stack([self._cache[i][1] for i in ids]).to(device)
        return emb, pooled

    def negative(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._negative is None:
            self.get(torch.zeros(1, dtype=torch.long), device)
        emb, pooled = self._negative
        return emb.to(device).expand(n, *emb.shape), None if pooled is None else pooled.to(device).expand(n, -1)


class LatentDenoiser(nn.Module):
    """The guided denoiser of a Stable-Diffusion-class pipeline: ``forward(x [B,C,h,w], t [B], cond [B] long)``.

    Args:
        pipe: a loaded diffusers pipeline (its text encoders and VAE stay outside this module's parameters).
        kind: 'sd15', 'sdxl' or 'sd3'.
        prompts: the task's prompt list (cond indexes it).
        guidance_scale: classifier-free guidance weight w (1: conditional branch only).
        height, width: image size in pixels (SDXL's micro-conditioning uses them).
    """

    state_dtype = torch.float32

    def __init__(self, pipe, kind: str, prompts: list[str], guidance_scale: float, height: int, width: int):
        super().__init__()
        self.kind = kind
        self.net = pipe.transformer if kind == "sd3" else pipe.unet
        self.__dict__["pipe"] = pipe
        self.__dict__["embeddings"] = PromptEmbeddings(pipe, kind, prompts)
        self.guidance_scale = float(guidance_scale)
        self.height, self.width = int(height), int(width)
        self.prediction_type = "flow" if kind == "sd3" else pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def net_dtype(self) -> torch.dtype:
        return next(p for p in self.net.parameters() if not p.requires_grad).dtype

    def call_net(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                 pooled: torch.Tensor | None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """One network call (no guidance) in the network's dtype; returns float32 [B, C, h, w]."""
        dtype = self.net_dtype
        x = x.to(dtype)
        emb = emb.to(dtype)
        if self.kind == "sd3":
            out = net(hidden_states=x, timestep=t.to(dtype), encoder_hidden_states=emb,
                      pooled_projections=pooled.to(dtype), return_dict=False)[0]
        elif self.kind == "sdxl":
            size = torch.tensor([self.height, self.width, 0, 0, self.height, self.width], device=x.device, dtype=dtype)
            added = {"text_embeds": pooled.to(dtype), "time_ids": size.expand(x.shape[0], 6)}
            out = net(x, t, encoder_hidden_states=emb, added_cond_kwargs=added, timestep_cond=timestep_cond,
                      return_dict=False)[0]
        else:
            out = net(x, t, encoder_hidden_states=emb, timestep_cond=timestep_cond, return_dict=False)[0]
        return out.to(torch.float32)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            raise ConfigError("a text-to-image denoiser needs prompt indices as its condition (got None)")
        emb, pooled = self.embeddings.get(cond, x.device)
        w = self.guidance_scale
        if w == 1.0:
            return self.call_net(self.net, x, t, emb, pooled)
        neg, neg_pooled = self.embeddings.negative(x.shape[0], x.device)
        both = self.call_net(self.net, torch.cat([x, x]), torch.cat([t, t]), torch.cat([neg, emb]),
                             None if pooled is None else torch.cat([neg_pooled, pooled]))
        uncond, text = both.chunk(2)
        return uncond + w * (text - uncond)

    @contextmanager
    def disable_adapter(self):
        """The reference: the same network with every adapter off (no second copy of the weights)."""
        with adapters_active(self.net, None):
            yield self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs: the policy LoRA only (the base weights are the user's pipeline)."""
        return policy_lora_state_dict(self.net)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_policy_lora_state_dict(self.net, state)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales w [B] (as 1000 w) for LCMs distilled with a w condition, [B, dim]."""
    w = w.to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class LatentConsistencyModel(nn.Module):
    """f(x, t, cond) -> x0 of a latent consistency model (LCM) at VP timesteps t, with LCM's boundary condition
    f = c_skip(t) x + c_out(t) x0_hat(eps), c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2),
    s = 0.5. Either a whole LCM UNet (``net``) or an LCM-LoRA loaded as the frozen ``consistency`` adapter of the
    policy's own network (``net`` None: no second UNet in memory). No guidance branch: LCMs bake it in (a
    w-conditioned LCM gets ``guidance_scale`` through its embedding).
    """

    def __init__(self, denoiser: LatentDenoiser, alphas_cumprod: torch.Tensor, net: nn.Module | None = None,
                 guidance_scale: float = 8.0, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        super().__init__()
        if denoiser.kind == "sd3":
            raise ConfigError("the consistency estimator needs an LCM of a UNet model (sd15/sdxl); for sd3 use "
                              "method.estimator=tweedie")
        self.__dict__["denoiser"] = denoiser
        if net is not None:
            self.net = net.requires_grad_(False).eval()
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float32), persistent=False)
        self.guidance_scale, self.timestep_scaling, self.sigma_data = guidance_scale, timestep_scaling, sigma_data

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        d = self.denoiser
        emb, pooled = d.embeddings.get(cond, x.device)
        net = self._modules.get("net")
        w_cond = None
        if net is not None and getattr(net.config, "time_cond_proj_dim", None):
            w = torch.full((x.shape[0],), self.guidance_scale - 1.0, device=x.device)
            w_cond = guidance_scale_embedding(w, net.config.time_cond_proj_dim).to(d.net_dtype)
        if net is None:
            with adapters_active(d.net, [CONSISTENCY_ADAPTER]):
                eps = d.call_net(d.net, x, t, emb, pooled)
        else:
            eps = d.call_net(net, x, t, emb, pooled, timestep_cond=w_cond)
        view = (-1, *([1] * (x.ndim - 1)))
        a = self.alphas_cumprod.to(x.device)[t.long()].view(view)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        st = (t.to(torch.float32) * self.timestep_scaling).view(view)
        c_skip = self.sigma_data**2 / (st**2 + self.sigma_data**2)
        c_out = st / (st**2 + self.sigma_data**2).sqrt()
        return c_skip * x + c_out * x0
