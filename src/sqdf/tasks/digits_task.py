"""The built-in image task: fine-tune the shipped 8x8 digits model toward a classifier or black-box reward.

Samples are [B, 1, 8, 8] in [-1, 1]; conditions are digit labels [B] (long) or None (unconditional). The
reference sampler is T-step DDIM (eta 1 by default) on the shipped model's cosine schedule, with classifier-free
guidance for conditional sampling. What is known of the optimum comes from base samples: J* = alpha log
E_ref[exp(r/alpha)] by Monte Carlo (with its stderr and effective sample size), and samples of the exact target
p*(x) ~ p_ref(x) exp(r(x)/alpha) by resampling the base samples with those weights (rejection sampling when the
weights are bounded), whose Frechet distance and diversity are reported as the target's.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..diffusion.schedule import NoiseSchedule, ScheduleConfig
from ..errors import ConfigError
from .base import KnownOptimum, Task, TaskConfig

REWARDS = ("classifier", "ink", "png", "jpeg")


def parse_digit_condition(text: str | int | None) -> list[int] | None:
    """None -> None (unconditional); 'all' -> 0..9; '1,7' -> [1, 7] (errors name the bad value)."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t == "all":
        return list(range(10))
    try:
        digits = [int(p) for p in t.replace(" ", "").split(",") if p != ""]
    except ValueError:
        digits = []
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise ConfigError(f"task.digit_condition={text!r} must be None, 'all' or digits 0-9 like '1,7'")
    return sorted(set(digits))


class DigitsTask(Task):
    name = "digits"
    description = "8x8 digits UNet (shipped), reward log p(3|x) by the shipped classifier; alpha 1"

    def __init__(self, config: TaskConfig):
        super().__init__(config)
        from ..digits.store import load_model, load_shipped

        if config.reward not in REWARDS:
            raise ConfigError(f"task.reward={config.reward!r} must be one of {REWARDS} for the digits task")
        self.condition_digits = parse_digit_condition(config.digit_condition)
        if config.reward == "classifier" and config.target_digit is None and self.condition_digits is None:
            raise ConfigError("task.target_digit=None takes the target from the condition, but "
                              "task.digit_condition=None (unconditional); set a target digit or a condition like 'all'")
        self.unet, self.unet_meta = (load_shipped("unet") if config.base_path is None
                                     else load_model(config.base_path, "unet"))
        self.classifier, _ = (load_shipped("classifier") if config.classifier_path is None
                              else load_model(config.classifier_path, "classifier"))
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        schedule_kind = self.unet_meta.get("schedule", "cosine")
        n_train = int(self.unet_meta.get("num_train_steps", 1000))
        if config.schedule != schedule_kind or config.num_train_steps != n_train:
            raise ConfigError(f"the digits model was trained on a {schedule_kind!r} schedule with {n_train} steps; "
                              f"set task.schedule={schedule_kind} task.num_train_steps={n_train} "
                              f"(got {config.schedule!r}, {config.num_train_steps})")
        self._reward = self._make_reward()
        self._reference: nn.Module | None = None
        self._schedule: NoiseSchedule | None = None
        self._optimum: tuple | None = None
        self._real_features: dict = {}
        self._optimal_metrics: dict | None = None
        self._features = copy.deepcopy(self.classifier).cpu()  # evaluation copy, kept on the CPU

    # ---- what the trainer needs --------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    @property
    def alpha(self) -> float:
        return 1.0 if self.config.alpha is None else self.config.alpha

    @property
    def differentiable_reward(self) -> bool:
        return self.config.reward in ("classifier", "ink")

    def _make_reward(self):
        from ..digits import rewards

        kind = self.config.reward
        if kind == "classifier":
            return rewards.ClassifierLogProb(self.classifier, self.config.target_digit, self.config.digit_offset)
        return {"ink": rewards.ink, "png": rewards.png_compressibility, "jpeg": rewards.jpeg_compressibility}[kind]

    def reward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self._reward, nn.Module):
            self._reward.to(x.device)
        return self._reward(x, cond)

    def make_schedule(self) -> NoiseSchedule:
        cfg = ScheduleConfig(kind=self.config.schedule, num_train_steps=self.config.num_train_steps)
        return NoiseSchedule(cfg, self.config.num_inference_steps, self.config.eta,
                             clip_sample=self.config.clip_sample, clip_sample_mode=self.config.clip_sample_mode)

    def build_reference(self, schedule: NoiseSchedule, out_dir: str | None = None) -> nn.Module:
        from ..digits.unet import ClassifierFreeGuidance

        ref = ClassifierFreeGuidance(copy.deepcopy(self.unet), self.config.guidance_scale).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self._reference, self._schedule = ref, schedule
        return ref

    def build_policy_model(self, reference: nn.Module) -> nn.Module:
        model = copy.deepcopy(reference)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()

    def sample_conditions(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        if self.condition_digits is None:
            return None
        digits = torch.tensor(self.condition_digits, dtype=torch.long)
        device = generator.device if generator is not None else "cpu"
        pick = torch.randint(0, len(digits), (n,), generator=generator, device=device)
        return digits.to(device)[pick]

    def proxy_features(self):
        """The shipped classifier's penultimate features (frozen, differentiable in x), [B, 32]."""
        from ..models.features import ModuleFeatures

        classifier = self.classifier
        dim = int(classifier.features(torch.zeros(1, *self.sample_shape)).shape[1])
        return ModuleFeatures(lambda x, cond=None: classifier.features(x), dim)

    def consistency_model(self) -> nn.Module:
        from ..digits.store import load_model, shipped_path

        path = shipped_path("consistency") if self.config.consistency_path is None else self.config.consistency_path
        model, meta = load_model(path, "consistency")
        scale = meta.get("guidance_scale")
        if self.condition_digits is not None and scale is not None and abs(scale - self.config.guidance_scale) > 1e-9:
            raise ConfigError(f"the consistency model {str(path)!r} was distilled at guidance scale {scale}, but "
                              f"task.guidance_scale={self.config.guidance_scale}; use guidance {scale}, the "
                              "Tweedie estimator, or distill one at your scale with scripts/train_digits.py")
        return model

    def export_model(self, model: nn.Module, path: str) -> None:
        """The fine-tuned UNet (or consistency model, for RLCM) in the shipped format: reload it with
        ``sqdf.digits.load_model(path, kind)``, or use a UNet as the base of another run with
        ``--set task.base_path=PATH``."""
        from ..digits.consistency import ConsistencyModel
        from ..digits.store import save_model

        inner = getattr(model, "model", model)
        kind = "consistency" if isinstance(inner, ConsistencyModel) else "unet"  # an RLCM run fine-tunes the CM
        save_model(inner, path, kind, schedule=self.config.schedule, num_train_steps=self.config.num_train_steps,
                   guidance_scale=self.config.guidance_scale)

    # ---- the optimum and the exact target, from base samples ------------------------------------------------
    def _base_samples(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(samples, cond, rewards) of optimum_samples draws of the reference sampler (fixed seed, cached)."""
        if self._optimum is None:
            from ..diffusion.policy import DiffusionPolicy

            if self._reference is None:
                self.build_reference(self.make_schedule())
            ref = self._reference
            device = next(ref.parameters()).device
            policy = DiffusionPolicy(ref, self._schedule, self.sample_shape, reference=ref)
            g = torch.Generator(device=device).manual_seed(20261123)
            n = self.config.optimum_samples
            chunks = []
            for start in range(0, n, 1024):
                m = min(1024, n - start)
                cond = self.sample_conditions(m, g)
                traj = policy.sample(m, cond, g, which="reference", with_reference=False)
                with torch.no_grad():
                    chunks.append((traj.samples, cond, self.reward(traj.samples, cond).to(torch.float64)))
            x = torch.cat([c[0] for c in chunks])
            cond = None if chunks[0][1] is None else torch.cat([c[1] for c in chunks])
            self._optimum = (x, cond, torch.cat([c[2] for c in chunks]))
        return self._optimum

    def known_optimum(self) -> KnownOptimum:
        """J* = alpha log mean exp(r/alpha) over base samples, with the delta-method stderr."""
        _, _, r = self._base_samples()
        a = self.alpha
        w = torch.exp((r - r.max()) / a)
        n = r.shape[0]
        optimum = float(r.max() + a * torch.log(w.mean()))
        stderr = float(a * w.std() / (w.mean() * math.sqrt(n)))
        p = w / w.sum()
        ess = float(1.0 / (p**2).sum())
        return KnownOptimum(optimum=optimum, reward_mean=float((p * r).sum()),
                            kl=float((p * torch.log(p * n)).sum()), optimum_stderr=stderr,
                            method=f"Monte Carlo over {n} base samples (ESS of the target weights {ess:.0f})")

    def target_samples(self, generator: torch.Generator | None = None):
        """Exact draws of p* ~ p_ref exp(r/alpha) by rejection sampling the cached base samples (accept each with
        probability exp((r - r_max)/alpha); exact when r_max bounds the reward, as for the bounded rewards here).
        Returns (samples [m, 1, 8, 8], cond or None); m is random, about n exp((J* - r_max)/alpha)."""
        x, cond, r = self._base_samples()
        w = torch.exp((r - r.max()) / self.alpha)
        keep = torch.rand(w.shape, generator=generator, dtype=torch.float64) < w
        return x[keep], None if cond is None else cond[keep]

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def _reference_class(self, cond_label: int | None) -> int | None:
        """The held-out class a sample is compared with: the reward's target digit when it has a fixed one and the
        task is unconditional; else the condition (None: all held-out digits)."""
        if self.config.reward == "classifier" and self.config.target_digit is not None and cond_label is None:
            return self.config.target_digit
        return cond_label

    def _real(self, digit: int | None) -> torch.Tensor:
        if digit not in self._real_features:
            from ..digits.data import load_digits_split

            _, held_out = load_digits_split()
            imgs = held_out.images if digit is None else held_out.of_class(digit)
            with torch.no_grad():
                self._real_features[digit] = self._features.features(imgs).to(torch.float64)
        return self._real_features[digit]

    def image_metrics(self, samples: torch.Tensor, cond: torch.Tensor | None) -> dict[str, float]:
        """Frechet distance to held-out real digits (per reference class, averaged by sample count), diversity
        (mean pairwise classifier-feature distance) and class accuracies of samples [n, 1, 8, 8]."""
        from ..digits.metrics import frechet_distance, mean_pairwise_distance

        x = samples.detach().to(torch.float32).cpu()
        with torch.no_grad():
            feats = self._features.features(x).to(torch.float64)
            pred = self._features.head(feats.float()).argmax(1)
        out: dict[str, float] = {}
        labels = None if cond is None else cond.detach().cpu().reshape(x.shape[0], -1)[:, 0].long()
        groups = [None] if labels is None else sorted(set(labels.tolist()))
        fd_sum, count = 0.0, 0
        for g in groups:
            mask = torch.ones(x.shape[0], dtype=torch.bool) if g is None else labels == g
            if int(mask.sum()) < 2:
                continue
            fd_sum += frechet_distance(feats[mask], self._real(self._reference_class(g))) * int(mask.sum())
            count += int(mask.sum())
        out["frechet"] = fd_sum / count if count else float("nan")
        out["diversity"] = mean_pairwise_distance(feats)
        out["pixel_diversity"] = mean_pairwise_distance(x.flatten(1))
        if self.config.reward == "classifier":
            targets = self._reward.targets(x.shape[0], labels, "cpu")
            out["target_accuracy"] = float((pred == targets).float().mean())
        if labels is not None:
            out["class_accuracy"] = float((pred == labels).float().mean())
        return out

    def evaluate(self, samples: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
        out = self.image_metrics(samples, cond)
        if self._optimal_metrics is None:
            tx, tcond = self.target_samples(torch.Generator().manual_seed(5))
            metrics = self.image_metrics(tx, tcond) if tx.shape[0] >= 2 else {}
            self._optimal_metrics = {f"optimal_{k}": metrics.get(k, float("nan")) for k in ("frechet", "diversity")}
            self._optimal_metrics["optimal_samples"] = int(tx.shape[0])
        out.update(self._optimal_metrics)
        return out

    def plot(self, samples: torch.Tensor, path: str, title: str = "", cond: torch.Tensor | None = None) -> None:
        """A grid with one row per conditioning digit (or per digit the classifier sees, when unconditional)."""
        from ..digits.pictures import save_class_grid

        x = samples.detach().float().cpu()
        if cond is not None:
            labels, row_name = cond.detach().cpu().reshape(x.shape[0], -1)[:, 0], "cond."
        else:
            with torch.no_grad():
                labels, row_name = self._features(x).argmax(1), "seen as"
        save_class_grid(x, labels, path, title=title, row_name=row_name)


def digits(config: TaskConfig) -> DigitsTask:
    return DigitsTask(config)
