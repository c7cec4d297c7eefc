"""RLCM (Oertell et al. 2024): PPO on the multi-step sampler of a consistency model.

The policy is a trainable copy of the task's consistency model f_theta run through ``ConsistencySchedule``: step k
maps x_{t_k} to N(signal_{k+1} f_theta(x_{t_k}, t_k), sigma_k^2 I) with sigma_k = noise_{k+1} (renoise to the next
timestep) and the small fixed ``final_std`` at the last step; the reference is the frozen consistency model on the
same grid, so per-step KLs are exact and their sum is the path KL. Training is DDPO's, unchanged: per iteration, sample
B chains, turn rewards (minus kl_coef * path KL) into per-condition normalized advantages and minimize the PPO-clip
loss on per-step probability ratios (``ppo_clip_loss``, ``PerConditionStatTracker``). Its point is few-step speed:
4 sampler steps by default instead of the DDIM sampler's 20-100.

The last step. A consistency sampler's last step (to the clean sample) is deterministic; here it is Gaussian with the
fixed std ``final_std`` so that every step has a density and the path KL is finite (it charges the last step
||f_theta - f_ref||^2 / (2 final_std^2)). The official code (Owen-Oertell/rlcm) instead renoises the last x0 back
to the last timestep's own noise level for its log-prob and returns the noiseless x0 as the image, so its last
step's action never reaches the reward. On gmm1 most of the path KL sits in the step from t = 500 to t = 250: PPO
credits every step with the whole chain's advantage and moves modes late, where it costs the most KL.

The method builds its own policy (``build_policy``): the Trainer, resume and ``sqdf sample`` all go through it. It
needs a task with a consistency model (the toy mixture tasks distill one from the exact score; digits ships one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import option
from ..errors import ConfigError
from .base import IterationContext
from .ddpo import DDPO, DDPOConfig


@dataclass
class RLCMConfig(DDPOConfig):
    """Hyperparameters of RLCM: DDPO's, plus the consistency sampler's (defaults chosen on gmm1 and digits, where
    the tasks' presets add final_std and kl_coef; see tasks/builtin.py)."""

    lr: float = option(3e-5, "AdamW learning rate")
    clip_range: float = option(1e-3, "PPO clip eps on the per-step probability ratio")
    num_inner_epochs: int = option(2, "passes over each sampled batch")
    num_minibatches: int = option(2, "gradient steps per pass (the chains are split into this many groups)")
    sampler_steps: int = option(4, "consistency sampler steps T on an evenly spaced grid from N-1 to 0 (the task's "
                                "num_inference_steps is ignored: it sets the DDIM sampler of the other methods)")
    final_std: float = option(0.05, "std of the last sampler step, in data units: that step (to the clean sample) "
                              "is deterministic in a consistency sampler and the policy needs a density there; it "
                              "blurs samples by N(0, final_std^2 I), and its KL grows as 1 / final_std^2")

    def validate(self) -> None:
        super().validate()
        if self.sampler_steps < 1:
            raise ConfigError(f"method.sampler_steps={self.sampler_steps} must be >= 1 (RLCM uses few, e.g. 4)")
        if not self.final_std > 0:
            raise ConfigError(f"method.final_std={self.final_std} must be > 0 (the last step needs a density; "
                              "try 0.05)")


class RLCM(DDPO):
    """DDPO's PPO iteration on the consistency-sampler policy that ``build_policy`` makes."""

    name = "rlcm"
    config_class = RLCMConfig

    @classmethod
    def build_policy(cls, task, config, out_dir, device):
        """Consistency-sampler policy: a trainable copy of the task's consistency model (``task.build_policy_model``)
        and the frozen model itself as the reference, on ``ConsistencySchedule`` (prediction type 'sample')."""
        from ..diffusion.consistency_schedule import ConsistencySchedule
        from ..diffusion.policy import DiffusionPolicy

        cfg: RLCMConfig = config.method
        cfg.validate()
        if getattr(task, "reference_in_policy", False):
            raise ConfigError(f"rlcm fine-tunes a copy of a consistency model; task {task.name} keeps its reference "
                              "inside the policy network (LoRA), which rlcm does not support: use a toy task or "
                              "digits")
        schedule = ConsistencySchedule(task.make_schedule(), cfg.sampler_steps, cfg.final_std)
        reference = task.consistency_model()
        if reference is None:
            raise ConfigError(f"rlcm needs a consistency model of the base, and task {task.name} has none; use ddpo "
                              "(the same algorithm on the DDIM sampler)")
        for p in reference.parameters():
            p.requires_grad_(False)
        model = task.build_policy_model(reference.eval())
        task.to(device)
        return DiffusionPolicy(model, schedule, task.sample_shape, reference=reference,
                               prediction_type="sample").to(device)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        """DDPO's iteration; also logs the last (small-std) step's share of the path KL, ``final_step_kl``."""
        drawn = []

        def rollout(n, cond=None):
            drawn.append(ctx.rollout(n, cond))
            return drawn[-1]

        stats = super().train_iteration(dataclasses.replace(ctx, rollout=rollout))
        stats["final_step_kl"] = float(drawn[-1].trajectory.kls[:, -1].mean())
        return stats
