"""DenseDPO (Wu et al. 2025, arXiv 2506.03517): DPO with one preference label per denoising-time window of
aligned pairs.

The paper works on video: it partially noises one video twice with independent noise and denoises both copies, so
the pair shares its coarse structure (motion) and differs in detail, then labels each temporal segment separately.
This library has no frames, so a "segment" is a window of denoising steps. No public code exists; this is our
reading, built from the library's D3PO machinery.

One iteration, with P = batch_size / 2 pairs and T sampler steps:

1. Aligned pairs. Draw P sources x_0 from the current policy (``policy.sample`` with the iteration's generator,
   unscored: they cost no reward query). With guidance eta, the pair restarts from grid index k0 = T - n, where
   n = round(eta T) steps remain: each source is noised twice with independent noise by the forward marginal of
   that grid point, x_{k0} = signal_{k0} x_0 + noise_{k0} eps (sqrt(abar), sqrt(1 - abar) for VP schedules), and
   both copies are denoised by the policy over the last n steps, keeping the reference's log-probs of the steps
   taken. eta = 1 restarts from fresh start noise x_T, independent for the two chains (no source is drawn): D3PO's
   setting without its shared x_T. Small eta: two close variations of the source.
2. Windows. The n re-denoised steps are cut into S = ``segments`` contiguous windows W_1 .. W_S (sizes differ by at
   most one). Window j is labelled by a Bradley-Terry comparison, at temperature tau (``label_temperature``), of
   the two chains' rewards of the clean estimate at the window's end: the policy's x0 prediction at that state,
   and for the last window the final sample. Each labelled window costs two reward queries (``ctx.reward``), so
   an iteration spends 2 P S.
3. Loss. With h_k = log pi_theta(a_k|s_k) - log pi_ref(a_k|s_k) per step (``log_ratio`` units), winner w and loser
   l of window j, and ties dropped, ``loss_form="window"`` (the default) minimizes

       L = mean_pairs sum_{decided j} -log sigmoid( beta sum_{k in W_j} [h_k(w) - h_k(l)] ),

   the mean over pairs with at least one decided window. ``loss_form="step"`` instead puts one sigmoid on every
   step, sum_{k in W_j} -log sigmoid(beta [h_k(w) - h_k(l)]), with window j's label (D3PO's form; S = 1 with
   eta = 1 is then D3PO's loss on pairs with independent start noise).

Why the sum sits inside the sigmoid by default. sum_{k in W_j} h_k is the log-ratio of the window's whole sub-path
given its start state, so each window term is DPO on that sub-path. For the first window the two chains share
its start state x_{k0}, and DPO there has the known Bradley-Terry optimum: with S = 1 it is path-level DPO on
the re-denoised steps, whose minimizer is p_ref(x_{k0+1:T} | x_{k0}) exp(r(x_0) / (beta tau)) / Z(x_{k0}), which
is exactly the conditional law of the tilted target p* given x_{k0} (PREFERENCES.md 10.1-10.2). D3PO's one sigmoid
per step does not have that property (10.4): a sum of per-step logistic losses fits each step's ratio to the
pair's label alone, a behaviour-policy Q rather than the soft one.

What the optimum is, and where it is not p*.
* eta = 1, S = 1, ``loss_form="window"``: DPO on whole chains with exact chain likelihoods (the start noise has
  the same law under both models). Its optimum is the tilt p_ref exp(r / (beta tau)) / Z; ``beta`` defaults to
  alpha / tau (``implicit_reward_weight``), which makes that the task's p*.
* eta < 1: only the last n steps are trained; every pair shares x_{k0}, so the loss says nothing about the steps
  before k0 (they move only through the network weights they share with later steps). At the loss's optimum the
  later steps are p*'s conditional given x_{k0}, but x_{k0}'s law stays near the reference's rather than p*'s,
  so the tilt is partial: coarse structure, fixed in the early steps, is not reweighted. Smaller eta gives more
  closely aligned pairs and less of the chain trained.
* S > 1: the labels of windows before the last compare predicted rewards r(x0_hat(s)), not realized ones, and
  from window 2 on the two chains start their windows in different states, whose normalizers Z do not cancel
  between the two terms. So it is a surrogate: its fixed point is near p*, not at it in general (near when the
  x0 estimate is good late in the chain and the pairs stay close); the bench measures where it lands.

``guidance`` defaults to 0.75, a trade-off between alignment and coverage: smaller eta aligns the pair more but
leaves more early steps untrained. 0.75 had the lowest regret of {0.25, 0.5, 0.75, 1} on gmm1 (seed 0, lr 3e-3,
S = 1, 16,384 queries: 2.40, 0.98, 0.53, 0.82), one seed only. On the toys' 100-step linear VP grid the restart
point (t ~ 750, sqrt(abar) ~ 0.06) keeps little of the source, so the pairs there are only loosely aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..diffusion.schedule import gaussian_kl, gaussian_log_prob
from ..errors import ConfigError
from ..preferences.labels import bradley_terry_labels, decided, preference_loss
from .base import IterationContext, Method, MethodConfig
from .common import (
    LOG_RATIO_HELP,
    check_pairwise_dpo,
    implicit_reward_weight,
    repeat_cond,
    sample_dim,
    step_log_ratio,
    transition_batch,
)

LOSS_FORMS = ("window", "step")


@dataclass
class DenseDPOConfig(MethodConfig):
    """Hyperparameters of DenseDPO (the paper's are for video and human / VLM segment labels; none transfer)."""

    lr: float = option(1e-4, "AdamW learning rate")
    beta: float | None = option(None, "DPO weight on the log-ratios; None: alpha / label_temperature (with "
                                "log_ratio='mean': times the sample's dimension), whose path-level optimum is the "
                                "task's tilted target")
    label_temperature: float = option(1.0, "Bradley-Terry temperature of each window's label drawn from the task "
                                      "reward (0: the deterministic comparison)")
    log_ratio: str = option("sum", LOG_RATIO_HELP + "; here 'sum' (nats) by default")
    guidance: float = option(0.75, "guidance level eta in (0, 1]: the pair restarts round(eta T) steps before the "
                             "end from its source sample noised twice (1: from independent fresh start noise)")
    segments: int = option(1, "windows S the re-denoised steps are cut into, each with its own label (2 reward "
                           "queries a pair and window); 1 <= S <= round(guidance T)")
    loss_form: str = option("window", "'window': one sigmoid per window on the summed log-ratios (path-level DPO "
                            "on the window); 'step': one sigmoid per step with its window's label (D3PO's form)")
    inner_steps: int = option(1, "gradient steps per sampled batch of pairs")

    def validate(self) -> None:
        super().validate()
        check_pairwise_dpo(self)
        if not 0 < self.guidance <= 1:
            raise ConfigError(f"method.guidance={self.guidance} must be in (0, 1] (1: independent fresh chains)")
        if self.segments < 1:
            raise ConfigError(f"method.segments={self.segments} must be >= 1 (1: one label for the whole pair)")
        if self.loss_form not in LOSS_FORMS:
            raise ConfigError(f"method.loss_form={self.loss_form!r} must be one of {LOSS_FORMS}")
        if self.inner_steps < 1:
            raise ConfigError(f"method.inner_steps={self.inner_steps} must be >= 1")


def redenoised_steps(guidance: float, num_steps: int) -> int:
    """n = round(guidance * T), halves rounded up: how many final sampler steps a pair re-denoises."""
    return int(guidance * num_steps + 0.5)


def window_bounds(num_steps: int, segments: int) -> list[tuple[int, int]]:
    """``segments`` contiguous windows [start, end) covering 0 .. num_steps - 1, sizes differing by at most one."""
    if not 1 <= segments <= num_steps:
        raise ValueError(f"{segments} windows for {num_steps} steps; need 1 <= segments <= steps")
    ends = [(j + 1) * num_steps // segments for j in range(segments)]
    return list(zip([0] + ends[:-1], ends))


def dense_dpo_loss(h_a: torch.Tensor, h_b: torch.Tensor, labels: torch.Tensor, windows: list[tuple[int, int]],
                   beta: float, form: str = "window") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, window margins [P, S]) of DenseDPO. h_a, h_b [P, n]: per-step log-ratios to the reference of the two
    chains of each pair (with grad); labels [P, S] per window (1: a won, 0: b won, 0.5: tie, no gradient);
    ``windows`` the S [start, end) step ranges. 'window': per window -log sigmoid(+-beta sum_{k in W} (h_a - h_b));
    'step': the sum over the window's steps of -log sigmoid(+-beta (h_a - h_b)_k). Summed over windows, averaged
    over the pairs with at least one decided window (all ties: a zero loss)."""
    if form not in LOSS_FORMS:
        raise ValueError(f"form={form!r} must be one of {LOSS_FORMS}")
    if labels.shape != (h_a.shape[0], len(windows)):
        raise ValueError(f"labels of shape {tuple(labels.shape)} for {h_a.shape[0]} pairs and {len(windows)} windows")
    diff = beta * (h_a - h_b)
    margins = torch.stack([diff[:, s:e].sum(1) for s, e in windows], 1)
    if form == "window":
        per_window = preference_loss(margins, labels)  # ties: 0
    else:
        per_window = torch.stack([preference_loss(diff[:, s:e], labels[:, j:j + 1].expand(-1, e - s)).sum(1)
                                  for j, (s, e) in enumerate(windows)], 1)
    keep = decided(labels).any(1)
    if not bool(keep.any()):
        return margins.sum() * 0.0, margins
    return per_window.sum(1)[keep].mean(), margins


@dataclass
class AlignedPairs:
    """2P chains re-denoised from grid index ``start`` (chains 2p and 2p + 1 form pair p): states [2P, n+1, *shape]
    (states[:, 0] the restart state, states[:, -1] the samples), the reference's log-probs of the steps taken and
    the per-step exact KLs [2P, n], cond [2P, ...] or None, and the sources [P, *shape] (None for a fresh start)."""

    states: torch.Tensor
    ref_log_probs: torch.Tensor
    kls: torch.Tensor
    cond: torch.Tensor | None
    start: int
    sources: torch.Tensor | None
    source_path_kl: torch.Tensor | None


@torch.no_grad()
def denoise_from(policy, x: torch.Tensor, start: int, cond: torch.Tensor | None, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the policy's sampler from state x at grid index ``start`` to the end: (states [B, T-start+1, *shape],
    reference log-probs of the steps taken [B, T-start], exact per-step KLs [B, T-start]), as in
    ``DiffusionPolicy.sample`` (whose log-probs are the same expressions)."""
    states, ref_logp, kls = [x], [], []
    for k in range(start, policy.num_steps):
        mean = policy.step_mean(x, k, cond, "policy")
        ref_mean = policy.step_mean(x, k, cond, "reference")
        sigma = policy.sigma(k)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + sigma * noise
        ref_logp.append(gaussian_log_prob(x, ref_mean, sigma))
        kls.append(gaussian_kl(mean, sigma, ref_mean, sigma))
        states.append(x)
    return torch.stack(states, 1), torch.stack(ref_logp, 1), torch.stack(kls, 1)


def aligned_pairs(policy, pairs: int, guidance: float, cond: torch.Tensor | None,
                  generator: torch.Generator) -> AlignedPairs:
    """P aligned pairs at guidance level eta (see the module docstring); ``cond`` [P, ...] or None, one per pair."""
    T = policy.num_steps
    start = T - redenoised_steps(guidance, T)
    if not 0 <= start < T:
        raise ConfigError(f"method.guidance={guidance} re-denoises {T - start} of the {T} sampler steps; it needs >= 1")
    cond2 = None if cond is None else cond.repeat_interleave(2, dim=0)
    if start == 0:  # eta = 1: independent fresh start noise, no source needed
        sources, source_kl = None, None
        x = policy.initial_noise(2 * pairs, generator)
    else:
        traj = policy.sample(pairs, cond, generator)
        sources, source_kl = traj.samples, traj.path_kl
        x0 = sources.repeat_interleave(2, dim=0)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        signal, noise = float(policy.schedule.signal[start]), float(policy.schedule.noise[start])
        x = signal * x0 + noise * eps
    states, ref_logp, kls = denoise_from(policy, x, start, cond2, generator)
    return AlignedPairs(states, ref_logp, kls, cond2, start, sources, source_kl)


def window_log_ratios(policy, pairs_data: AlignedPairs, convention: str) -> torch.Tensor:
    """h_k = log pi_theta - log pi_ref of every re-denoised step, [2P, n], in ``convention``'s unit; differentiable
    in the policy (the reference's log-probs are the sampler's)."""
    states = pairs_data.states
    B, n = states.shape[0], states.shape[1] - 1
    chains = torch.arange(B, device=states.device)
    x, x_next, k = transition_batch(states, chains)
    log_probs = policy.step_log_prob(x, x_next, k + pairs_data.start, repeat_cond(pairs_data.cond, chains, n))
    return step_log_ratio(log_probs, pairs_data.ref_log_probs.reshape(-1), sample_dim(policy), convention).view(B, n)


class DenseDPO(Method):
    name = "dense-dpo"
    config_class = DenseDPOConfig

    def __init__(self, config: DenseDPOConfig, policy, alpha: float):
        super().__init__(config, policy, alpha)
        T = policy.num_steps
        n = redenoised_steps(config.guidance, T)
        if n < 1:
            raise ConfigError(f"method.guidance={config.guidance} re-denoises round({config.guidance} x {T}) = 0 of "
                              f"the {T} sampler steps; raise it to at least {0.5 / T:.3g}")
        if config.segments > n:
            raise ConfigError(f"method.segments={config.segments} exceeds the {n} re-denoised steps (guidance "
                              f"{config.guidance} x {T} sampler steps); use segments <= {n} or raise method.guidance")
        if any(policy.sigma(k) <= 0 for k in range(T - n, T)):
            raise ConfigError("dense-dpo needs a stochastic sampler (step log-probs); the task's sampler has a "
                              "deterministic step (eta = 0): set task.eta > 0")
        self.windows = window_bounds(n, config.segments)
        self.beta = implicit_reward_weight(config.beta, alpha, policy, config.log_ratio, config.label_temperature)

    def _window_rewards(self, ctx: IterationContext, data: AlignedPairs) -> torch.Tensor:
        """Rewards [S, 2P] of each window's clean estimate (2 P S queries in one call)."""
        estimates = []
        for j, (_, end) in enumerate(self.windows):
            state = data.states[:, end]
            if j == len(self.windows) - 1:
                estimates.append(state)  # the final sample itself
            else:
                estimates.append(self.policy.predict(state, data.start + end, data.cond, "policy")[1])
        S = len(self.windows)
        cond = None if data.cond is None else torch.cat([data.cond] * S, 0)
        return ctx.reward(torch.cat(estimates, 0), cond).view(S, -1)

    def train_iteration(self, ctx: IterationContext) -> dict[str, float]:
        cfg = self.config
        pairs = cfg.batch_size // 2
        self.policy.eval()
        data = aligned_pairs(self.policy, pairs, cfg.guidance, ctx.conditions(pairs), ctx.generator)
        with torch.no_grad():
            rewards = self._window_rewards(ctx, data).view(len(self.windows), pairs, 2)
        labels = bradley_terry_labels(rewards[..., 0].reshape(-1), rewards[..., 1].reshape(-1),
                                      cfg.label_temperature, ctx.generator).view(len(self.windows), pairs).T
        self.policy.train()
        losses, accs, grad_norms = [], [], []
        for _ in range(cfg.inner_steps):
            h = window_log_ratios(self.policy, data, cfg.log_ratio).view(pairs, 2, -1)
            lab = labels.to(h.device)
            loss, margins = dense_dpo_loss(h[:, 0], h[:, 1], lab, self.windows, self.beta, cfg.loss_form)
            stats = ctx.optimizer_step(loss)
            losses.append(float(loss.detach()))
            grad_norms.append(stats["grad_norm"])
            keep = decided(lab)
            right = (margins.detach() * (lab * 2 - 1)) > 0
            accs.append(float(right.float()[keep].mean()) if bool(keep.any()) else 0.5)
        samples = data.states[:, -1].view(pairs, 2, -1)
        path_kl = data.kls.sum(1) if data.source_path_kl is None else data.source_path_kl
        out = {"loss": sum(losses) / len(losses), "implicit_accuracy": sum(accs) / len(accs),
               "ties": float((labels == 0.5).float().mean()), "grad_norm": sum(grad_norms) / len(grad_norms),
               "path_kl": float(path_kl.mean()), "window_kl": float(data.kls.sum(1).mean()),
               "final_reward": float(rewards[-1].mean()),
               "pair_distance": float((samples[:, 0] - samples[:, 1]).norm(dim=1).mean())}
        if data.sources is not None:
            src = data.sources.reshape(pairs, 1, -1)
            out["source_distance"] = float((samples - src).norm(dim=2).mean())
        return out
