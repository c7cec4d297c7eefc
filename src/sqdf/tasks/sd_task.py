"""Text-to-image tasks on Stable-Diffusion-class pipelines: a LoRA policy on the denoiser, the frozen base as the
reference, a reward from the zoo on decoded images, and a prompt set.

States are latents [C, h, w]; conditions are prompt indices. ``task.model`` points at a local diffusers pipeline
folder (``--model DIR``); ``task.tiny`` builds random tiny models of the same family instead (``--tiny``), and tiny
random reward models when no ``task.reward_weights`` is given, so every path runs on a CPU without a download.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from .base import Task, TaskConfig


@dataclass
class DiffusersTaskConfig(TaskConfig):
    """Options of the diffusers tasks (sd15-*, sdxl-*, sd3-*), on top of the shared TaskConfig."""

    model: str | None = field(default=None, metadata={
        "help": "local diffusers pipeline folder (model_index.json + unet/ or transformer/, vae/, text encoders)"})
    tiny: bool = field(default=False, metadata={
        "help": "use tiny random models of the same family (and tiny random reward models): a CPU smoke run"})
    reward: str = field(default="aesthetic", metadata={
        "help": "reward spec: aesthetic, hpsv2, imagereward, pickscore, clip, jpeg_compressibility, "
                "jpeg_incompressibility, or a weighted sum like 'aesthetic+0.1*hpsv2'"})
    reward_weights: str | None = field(default=None, metadata={
        "help": "local weights of the reward: PATH, or name=PATH,name2=PATH for a sum (see README)"})
    prompts: str = field(default="animals", metadata={
        "help": "prompt set: 'animals' (the 45 DDPO animals) or a .txt / .json (HPDv2-style) / .jsonl file"})
    guidance_scale: float = field(default=5.0, metadata={"help": "classifier-free guidance of policy and reference"})
    resolution: int | None = field(default=None, metadata={"help": "image side in pixels (None: the model's own)"})
    lora_rank: int = field(default=4, metadata={"help": "rank of the policy's LoRA adapter on the denoiser"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (None: the rank, scale 1)"})
    model_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen base weights: float32, bf16 or fp16 (LoRA weights stay float32)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute denoiser and VAE activations in the backward pass (less memory, more time)"})
    flow_shift: float | None = field(default=None, metadata={"help": "sd3: time shift (None: the scheduler's)"})
    flow_step: str = field(default="sde", metadata={
        "help": "sd3: sampler step, 'sde' (Flow-GRPO's SDE step, task.eta its noise level a, 0.7 by default) or "
                "'ddim' (task.eta in [0, 1]; 0: diffusers' deterministic Euler step); both O(1/T) in the final "
                "marginal, 'sde' 3x closer at 28 steps (README, Stable Diffusion)"})
    proxy_clip: str | None = field(default=None, metadata={
        "help": "`sqdf blackbox`: local transformers CLIP folder whose image embeddings the proxy reward is fit on "
                "(None: the CLIP model inside the reward, e.g. the aesthetic scorer's)"})
    consistency_guidance: float = field(default=8.0, metadata={
        "help": "guidance scale given to a w-conditioned LCM (the consistency estimator)"})


def _beta_kind(name: str) -> str:
    table = {"scaled_linear": "scaled_linear", "linear": "linear", "squaredcos_cap_v2": "cosine"}
    if name not in table:
        raise ConfigError(f"the pipeline's scheduler has beta_schedule={name!r}; supported: {sorted(table)}")
    return table[name]


class DiffusersTask(Task):
    """A text-to-image fine-tuning task on a diffusers pipeline of ``kind`` ('sd15', 'sdxl' or 'sd3')."""

    reference_in_policy = True  # the reference is the policy network with its adapters off

    def __init__(self, config: DiffusersTaskConfig, kind: str, name: str, description: str = ""):
        super().__init__(config)
        from ..sd.pipelines import load_pipeline, tiny_pipeline_path, torch_dtype
        from ..sd.prompts import load_prompts

        self.name, self.kind, self.description = name, kind, description
        if config.lora_rank < 1:
            raise ConfigError(f"task.lora_rank={config.lora_rank} must be >= 1")
        if config.model is None and not config.tiny:
            raise ConfigError(f"task {name} needs a pipeline: pass --model DIR (a local diffusers folder of the "
                              f"{kind} family) or --tiny for random tiny models")
        path = tiny_pipeline_path(kind) if config.tiny and config.model is None else config.model
        self.pipe, _ = load_pipeline(path, kind, torch_dtype(config.model_dtype))
        self.prompts = load_prompts(config.prompts)
        self.vae = self.pipe.vae
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        net = self.pipe.transformer if kind == "sd3" else self.pipe.unet
        multiple = self.vae_scale * (net.config.patch_size if kind == "sd3" else 1)
        self.resolution = config.resolution or net.config.sample_size * self.vae_scale
        if self.resolution % multiple:
            raise ConfigError(f"task.resolution={self.resolution} must be a multiple of {multiple} for this model")
        channels = net.config.in_channels
        self._shape = (channels, self.resolution // self.vae_scale, self.resolution // self.vae_scale)
        self.reward_model = self._load_reward()
        self.denoiser = None

    # ---- what the Trainer builds ------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def alpha(self) -> float:
        """KL weight; default 4 / (latent dims): the official SQDF weight 2 on the mean-over-dims KL ||dmu||^2 /
        sigma^2, rewritten for the exact (summed, halved) KL."""
        return self.config.alpha if self.config.alpha is not None else 4.0 / math.prod(self._shape)

    def make_schedule(self):
        from ..diffusion.schedule import FlowMatchSchedule, NoiseSchedule, ScheduleConfig

        sc = self.pipe.scheduler.config
        if self.kind == "sd3":
            shift = self.config.flow_shift if self.config.flow_shift is not None else sc.get("shift", 3.0)
            return FlowMatchSchedule(self.config.num_inference_steps, self.config.eta, shift,
                                     sc.get("num_train_timesteps", 1000), self.config.flow_step)
        cfg = ScheduleConfig(kind=_beta_kind(sc.get("beta_schedule", "scaled_linear")),
                             num_train_steps=sc.get("num_train_timesteps", 1000),
                             beta_start=sc.get("beta_start", 0.00085), beta_end=sc.get("beta_end", 0.012))
        return NoiseSchedule(cfg, self.config.num_inference_steps, self.config.eta)

    def build_reference(self, schedule, out_dir: str | None = None) -> nn.Module:
        from ..sd.denoisers import LatentDenoiser

        self._alphas_cumprod = getattr(schedule, "alphas_cumprod", None)
        self.denoiser = LatentDenoiser(self.pipe, self.kind, self.prompts, self.config.guidance_scale,
                                       self.resolution, self.resolution)
        return self.denoiser

    def build_policy_model(self, reference: nn.Module) -> nn.Module:
        from ..sd.adapters import TRANSFORMER_TARGETS, UNET_TARGETS, adapter_aware_checkpointing, add_policy_lora

        targets = TRANSFORMER_TARGETS if self.kind == "sd3" else UNET_TARGETS
        add_policy_lora(reference.net, self.config.lora_rank, self.config.lora_alpha, targets)
        if self.config.gradient_checkpointing:
            reference.net.enable_gradient_checkpointing(adapter_aware_checkpointing(reference.net))
            self.vae.enable_gradient_checkpointing()
        return reference

    def to(self, device) -> "DiffusersTask":
        self.pipe.to(device)
        self.reward_model.to(device)
        return self

    def consistency_model(self) -> nn.Module:
        from ..sd.consistency import load_consistency_model

        return load_consistency_model(self, self.config.consistency_path)

    def _proxy_clip(self):
        """(CLIP model with an image tower and projection, preprocessing mean, std) for the proxy features."""
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        from ..sd.rewards.clip_score import CLIP_MEAN, CLIP_STD, load_clip_folder, preprocess_stats

        if self.config.proxy_clip is not None:
            model = load_clip_folder(self.config.proxy_clip, CLIPVisionModelWithProjection, "task.proxy_clip",
                                     "a transformers CLIP folder (config.json + model.safetensors)",
                                     "any CLIP checkpoint saved with save_pretrained")
            return (model, *preprocess_stats(self.config.proxy_clip))
        for module in self.reward_model.modules():
            for name in ("clip", "model"):
                model = getattr(module, name, None)
                if isinstance(model, (CLIPModel, CLIPVisionModelWithProjection)):
                    return model, getattr(module, "mean", CLIP_MEAN), getattr(module, "std", CLIP_STD)
        raise ConfigError(f"task.reward={self.config.reward!r} holds no CLIP model for the black-box proxy's "
                          "features; pass task.proxy_clip=DIR (a local transformers CLIP folder)")

    def proxy_features(self):
        """Unit-norm CLIP image embeddings of the decoded samples, with a one-hot of the prompt index appended
        (prompt sets of up to 256 prompts), [B, projection_dim (+ prompts)]; differentiable in the latents."""
        from ..models.features import ModuleFeatures
        from ..sd.rewards.clip_score import clip_image_embeds

        model, mean, std = self._proxy_clip()
        cfg = getattr(model.config, "vision_config", model.config)
        prompts = len(self.prompts) if len(self.prompts) <= 256 else 0
        dim = int(getattr(model.config, "projection_dim", cfg.projection_dim)) + prompts

        def features(x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
            model.to(x.device)
            emb = clip_image_embeds(model, self.decode(x), mean, std).to(torch.float32)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            if prompts and cond is not None:
                emb = torch.cat([emb, torch.nn.functional.one_hot(cond.long().reshape(-1), prompts).to(emb)], 1)
            elif prompts:
                emb = torch.cat([emb, emb.new_zeros(emb.shape[0], prompts)], 1)
            return emb

        return ModuleFeatures(features, dim)

    # ---- reward ------------------------------------------------------------------------------------------------
    def _load_reward(self):
        from ..sd.rewards import load_reward

        weights = self.config.reward_weights
        if weights is None and self.config.tiny:
            from ..sd.tiny import write_tiny_reward_weights

            weights = write_tiny_reward_weights(self.config.reward)
        return load_reward(self.config.reward, weights)

    @property
    def differentiable_reward(self) -> bool:
        return bool(self.reward_model.differentiable)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (float32), differentiable."""
        vae = self.vae
        z = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        dtype = next(vae.parameters()).dtype
        images = vae.decode(z.to(dtype), return_dict=False)[0].to(torch.float32)
        return (images / 2 + 0.5).clamp(0, 1)

    def prompts_of(self, cond: torch.Tensor) -> list[str]:
        return [self.prompts[int(i)] for i in cond.reshape(-1).tolist()]

    def reward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ConfigError("the text-to-image reward needs the prompt indices of the samples")
        model = self.reward_model
        model.to(x.device)
        return model(self.decode(x), self.prompts_of(cond)).to(torch.float32)

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(len(self.prompts), (n,), generator=generator, device=device)

    # ---- evaluation, pictures, export ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode_batched(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        return torch.cat([self.decode(latents[i:i + batch]) for i in range(0, latents.shape[0], batch)])

    @torch.no_grad()
    def evaluate(self, samples: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
        """Per-term reward means of a weighted-sum reward (on the full decoded images) and diversity: the mean
        pairwise L2 distance between decoded images (downsampled to 64 x 64, RGB in [0, 1]) that share a prompt,
        averaged over prompts drawn two or more times."""
        import torch.nn.functional as F

        out: dict[str, float] = {}
        small, terms = [], {}
        split = hasattr(self.reward_model, "last_terms")  # a weighted sum: report its terms
        for i in range(0, samples.shape[0], 16):
            images = self.decode(samples[i:i + 16])
            small.append(F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True).flatten(1))
            if split:
                self.reward_model(images, self.prompts_of(cond[i:i + 16]))
                for name, values in self.reward_model.last_terms.items():
                    terms.setdefault(name, []).append(values.float())
        flat = torch.cat(small)
        dists = []
        for c in cond.unique():
            rows = flat[cond == c]
            if rows.shape[0] >= 2:
                n = rows.shape[0]
                dists.append(float(torch.cdist(rows, rows).sum() / (n * (n - 1))))
        out["diversity"] = sum(dists) / len(dists) if dists else None  # no prompt drawn twice
        for name, values in terms.items():
            out[f"reward_{name}"] = float(torch.cat(values).mean())
        return out

    def plot(self, samples: torch.Tensor, path: str, title: str = "", cond: torch.Tensor | None = None) -> None:
        """A grid of up to 16 decoded samples with their prompts."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = min(16, samples.shape[0])
        images = self.decode_batched(samples[:n]).permute(0, 2, 3, 1).cpu().numpy()
        cols = min(4, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(images[i])
                if cond is not None:
                    ax.set_title(self.prompts[int(cond[i])][:28], fontsize=7)
        fig.suptitle(title, fontsize=9)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def export_model(self, model: nn.Module, path: str) -> None:
        """Write the policy LoRA to DIR/lora/pytorch_lora_weights.safetensors (``pipe.load_lora_weights`` format;
        ``path`` is DIR/model.safetensors, which is not written for LoRA runs)."""
        from ..sd.adapters import save_lora

        save_lora(type(self.pipe), model.net, os.path.join(os.path.dirname(path), "lora"),
                  transformer=self.kind == "sd3")


def diffusers_task(kind: str, reward: str, description: str):
    """A TASKS factory for a (family, reward) preset."""

    def build(config: TaskConfig) -> DiffusersTask:
        if not isinstance(config, DiffusersTaskConfig):
            raise ConfigError("diffusers tasks need a DiffusersTaskConfig (use sqdf.tasks.default_task_config)")
        return DiffusersTask(config, kind, f"{kind}-{reward}", description)

    build.kind, build.reward = kind, reward
    return build
