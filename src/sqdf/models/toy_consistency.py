"""Consistency models for Gaussian-mixture (toy) tasks, distilled from the exact score.

The consistency function of a VP diffusion maps a state x_t to the end (training timestep 0) of the probability-flow
ODE through it. For a mixture base the ODE's drift is analytic, so the endpoint is computed by a fine deterministic
solve (``pf_ode_endpoint``: Heun, 64 steps) and a small network is fit to it by regression
(``distill_toy_consistency``). The model (``ToyConsistencyModel``) is a mixture of per-component flows,

    f(x, t) = sum_k softmax_k(logits_k + (1 - abar_t) dlogits_k) (flows_k + (1 - abar_t) s offsets_k),   f(x, 0) = x,

where logits_k are the exact log-responsibilities of the noised components, flows_k the exact PF-ODE map of component
k alone, s^2 the data's mean second moment per dimension, and (dlogits, offsets) one zero-initialized MLP's output.
Untrained it is exact for a single Gaussian and close to exact wherever the noised components separate (small t);
training sharpens the responsibilities into the ODE's basins of attraction, which a plain regressor blurs (a Tweedie
estimate plus an MLP correction had 3-4x the error at t >= 500 on mix25to9). The learned terms vanish as abar_t -> 1.
Files are safetensors with the network's weights and metadata {kind, arch, fingerprint, steps, task}; the fingerprint
(sha256 of the mixture and the schedule's abar) ties a file to the task it was distilled for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable

import torch
from torch import nn

from ..diffusion.mixture import GaussianMixture
from ..errors import ConfigError
from .denoisers import MixtureScoreDenoiser, timestep_embedding

VERSION = "toy-consistency-v1"
KIND = "toy-consistency"
DEFAULT_STEPS = 3000  # optimizer steps of the default distillation (20-60 s on one CPU core for the 2-D mixtures)
TARGET_ODE_STEPS = 64  # Heun steps behind each regression target (error against 512 steps: see ``ode_error``)


# ---- the probability-flow ODE, solved exactly enough --------------------------------------------------------------
def karras_sigmas(sigma_max: torch.Tensor, sigma_min: torch.Tensor, num_steps: int, rho: float = 3.0) -> torch.Tensor:
    """Per-sample rho-spaced grids from sigma_max [B] down to sigma_min [B] (EDM): [B, num_steps + 1], float64."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)[None]
    hi, lo = sigma_max.to(torch.float64)[:, None] ** (1 / rho), sigma_min.to(torch.float64)[:, None] ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho


def pf_ode_endpoint(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    abar_start: torch.Tensor,
    abar_end: torch.Tensor,
    num_steps: int = TARGET_ODE_STEPS,
) -> torch.Tensor:
    """Solve the VP probability-flow ODE from x [B, d] at levels abar_start [B] to abar_end [B] (>= abar_start).

    In y = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar) the ODE is dy/dsigma = eps(x, abar) (DDIM eta = 0 is its
    Euler method); this runs Heun's method on a rho-spaced sigma grid (rho 3: at 64 steps its error against 1024
    steps is 2-7e-2 RMS at t = 999 on the built-in mixtures and below 5e-4 from t = 500 down, half that of EDM's 7).
    eps_fn(x [B, d], abar [B]) -> eps [B, d].
    Returns the state at abar_end, [B, d] float64.
    """
    if num_steps < 1:
        raise ConfigError(f"ODE num_steps={num_steps} must be >= 1")
    a0, a1 = abar_start.to(torch.float64), abar_end.to(torch.float64)
    sig = karras_sigmas(((1 - a0) / a0).sqrt(), ((1 - a1) / a1).sqrt(), num_steps)  # [B, n + 1]
    y = x.to(torch.float64) / a0.sqrt()[:, None]

    def drift(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        abar = 1 / (1 + s**2)
        return eps_fn(y * abar.sqrt()[:, None], abar).to(torch.float64)

    for i in range(num_steps):
        s, s_next = sig[:, i], sig[:, i + 1]
        h = (s_next - s)[:, None]
        d = drift(y, s)
        y_euler = y + h * d
        y = y + h * 0.5 * (d + drift(y_euler, s_next))
    return y * a1.sqrt()[:, None]


def exact_eps_fn(mixture: GaussianMixture) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps(x, abar) = -sqrt(1 - abar) grad log p_abar(x) of the noised mixture, float64 (abar [B], any level)."""
    den = MixtureScoreDenoiser(mixture, torch.ones(1))
    return lambda x, abar: -(1 - abar)[:, None].sqrt() * den.noised_score(x, abar)


def mixture_fingerprint(mixture: GaussianMixture, alphas_cumprod: torch.Tensor) -> str:
    """sha256 (hex) of the mixture's means, covariances and weights and of the schedule's abar (float64 bytes)."""
    h = hashlib.sha256(VERSION.encode())
    for t in (mixture.means, mixture.covs, mixture.weights, alphas_cumprod):
        h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---- the model ------------------------------------------------------------------------------------------------
class TimeMLP(nn.Module):
    """[x [B, d_in], emb(t)] -> [B, d_out]: SiLU MLP with a zero-initialized output layer (outputs 0 at start)."""

    def __init__(self, d_in: int, d_out: int, hidden: int, num_layers: int, num_train_steps: int, time_dim: int = 32):
        super().__init__()
        self.time_dim, self.num_train_steps = time_dim, num_train_steps
        layers: list[nn.Module] = []
        width = d_in + time_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, d_out)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([x, timestep_embedding(t, self.time_dim, self.num_train_steps)], 1)))


def component_flows(x: torch.Tensor, abar: torch.Tensor, abar_end: torch.Tensor, means: torch.Tensor,
                    evals: torch.Tensor, evecs: torch.Tensor,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-component pieces of the mixture's PF-ODE map, for x [B, d] at levels abar [B] (float64).

    Returns (logits [B, K] = log w_k + log N(x; sqrt(a) m_k, a S_k + (1 - a) I), i.e. the exact log-responsibilities
    up to a constant, and flows [B, K, d]): flows_k is where the PF-ODE of component k alone carries x at level
    abar_end, sqrt(a_end) m_k + U_k diag(sqrt((a_end l + 1 - a_end) / (a l + 1 - a))) U_k^T (x - sqrt(a) m_k),
    exact for a single Gaussian (S_k = U_k diag(l) U_k^T: means [K, d], evals [K, d], evecs [K, d, d]).
    """
    a, a1 = abar[:, None, None], abar_end[:, None, None]
    diff = x[:, None, :] - a.sqrt() * means[None]  # [B, K, d]
    proj = torch.einsum("kji,bkj->bki", evecs, diff)  # U^T diff
    var = a * evals[None] + (1 - a)
    logits = torch.log(weights)[None] - 0.5 * ((proj**2 / var) + torch.log(var)).sum(-1)
    scaled = proj * ((a1 * evals[None] + (1 - a1)) / var).sqrt()
    flows = a1.sqrt() * means[None] + torch.einsum("kij,bkj->bki", evecs, scaled)
    return logits, flows


class ToyConsistencyModel(nn.Module):
    """f(x [B, d], t [B] integer training timesteps, cond ignored) -> x0 [B, d], a mixture of per-component flows:

        f(x, t) = sum_k softmax_k(logits_k + (1 - abar_t) dlogits_k) (flows_k + (1 - abar_t) s offsets_k),
        f(x, 0) = x,

    with ``component_flows`` (exact logits and flows to timestep 0), and (dlogits [K], offsets [K, d]) from one MLP of
    (x / sqrt(abar s^2 + 1 - abar), t), s^2 the data's mean second moment per dimension. The MLP starts at zero: the
    model starts as each component's exact flow weighted by the exact responsibilities (exact for one Gaussian, and
    near-exact once the noised components separate); training sharpens the responsibilities into the ODE's basins of
    attraction and moves the flows. Differentiable in x. ``prediction_type`` is 'sample' (the policy reads it).
    """

    prediction_type = "sample"

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor, hidden: int = 128,
                 num_layers: int = 3):
        super().__init__()
        self.hidden, self.num_layers = int(hidden), int(num_layers)
        self.exact = MixtureScoreDenoiser(mixture, alphas_cumprod)  # holds the mixture's eigen-decomposition
        self.num_components, self.dim = mixture.num_components, mixture.dim
        second_moment = float((mixture.means**2).sum(1) @ mixture.weights
                              + torch.einsum("kii->k", mixture.covs) @ mixture.weights) / mixture.dim
        self.register_buffer("second_moment", torch.tensor(second_moment, dtype=torch.float64), persistent=False)
        self.net = TimeMLP(self.dim, self.num_components * (1 + self.dim), hidden, num_layers,
                           alphas_cumprod.shape[0])

    def arch(self) -> dict:
        return {"hidden": self.hidden, "num_layers": self.num_layers}

    def features(self, x64: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fixed (parameter-free) parts at states x64 [B, d] float64, timesteps t [B]:
        (logits [B, K], flows [B, K, d], net input [B, d] float32, logit scale [B], offset scale [B])."""
        e = self.exact
        a = e.alphas_cumprod[t]
        logits, flows = component_flows(x64, a, e.alphas_cumprod[torch.zeros_like(t)], e.means, e.evals, e.evecs,
                                        e.weights)
        m2 = self.second_moment
        x_in = (x64 / (a * m2 + 1 - a).sqrt()[:, None]).to(torch.float32)
        return logits, flows, x_in, 1 - a, (1 - a) * m2**0.5

    def combine(self, logits, flows, out, logit_scale, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 [B, d], total logits [B, K]) in flows' dtype from the fixed parts and the MLP's output [B, K (1 + d)]."""
        k = self.num_components
        total = logits + out[:, :k].to(logits.dtype) * logit_scale[:, None]
        offsets = out[:, k:].to(flows.dtype).view(-1, k, self.dim) * scale[:, None, None]
        x0 = (torch.softmax(total, 1)[..., None] * (flows + offsets)).sum(1)
        return x0, total

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        t = t.to(x.device).long()
        x64 = x.flatten(1).to(torch.float64)
        logits, flows, x_in, logit_scale, scale = self.features(x64, t)
        x0, _ = self.combine(logits, flows, self.net(x_in, t), logit_scale, scale)
        return torch.where((t == 0)[:, None], x64, x0).to(x.dtype).view_as(x)


# ---- distillation ---------------------------------------------------------------------------------------------
def forward_process_pairs(mixture: GaussianMixture, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with x_0 from the mixture, for timesteps t [B]: [B, d] float64."""
    x0 = mixture.sample(t.shape[0], generator)
    a = alphas_cumprod.to(torch.float64)[t][:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, dtype=torch.float64, generator=generator)


def ode_targets(mixture: GaussianMixture, alphas_cumprod: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                num_steps: int = TARGET_ODE_STEPS, chunk: int = 16384) -> torch.Tensor:
    """PF-ODE endpoints at training timestep 0 of states x [B, d] at timesteps t [B] (t = 0: x itself), float64."""
    eps = exact_eps_fn(mixture)
    abar = alphas_cumprod.to(torch.float64)
    out = []
    for start in range(0, x.shape[0], chunk):
        xs, ts = x[start:start + chunk], t[start:start + chunk]
        end = pf_ode_endpoint(eps, xs, abar[ts], abar[torch.zeros_like(ts)], num_steps)
        out.append(torch.where((ts == 0)[:, None], xs.to(torch.float64), end))
    return torch.cat(out)


def consistency_mse(model: nn.Module, mixture: GaussianMixture, alphas_cumprod: torch.Tensor,
                    timesteps: list[int], n: int = 4096, ode_steps: int = 512, seed: int = 1) -> dict[int, float]:
    """{t: E||f(x_t, t) - ODE endpoint||^2 / d} over x_t from the forward process at each timestep t, against a
    ``ode_steps``-step Heun solve (the reference). A model here is anything called as model(x, t) -> x0."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t_val in timesteps:
        t = torch.full((n,), int(t_val), dtype=torch.long)
        x = forward_process_pairs(mixture, alphas_cumprod, t, g)
        target = ode_targets(mixture, alphas_cumprod, x, t, ode_steps)
        with torch.no_grad():
            pred = model(x.to(torch.float32), t).to(torch.float64)
        out[int(t_val)] = float(((pred - target) ** 2).mean())
    return out


def ode_error(mixture: GaussianMixture, alphas_cumprod: torch.Tensor, timesteps: list[int],
              num_steps: int = TARGET_ODE_STEPS, n: int = 4096, fine_steps: int = 512) -> dict[int, float]:
    """{t: mean squared error per dimension} of the ``num_steps``-step targets against a ``fine_steps`` solve."""
    solver = lambda x, t: ode_targets(mixture, alphas_cumprod, x, t, num_steps)  # noqa: E731
    return consistency_mse(solver, mixture, alphas_cumprod, timesteps, n, fine_steps)


def distill_toy_consistency(
    mixture: GaussianMixture,
    alphas_cumprod: torch.Tensor,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 512,
    pool_size: int | None = None,
    lr: float = 2e-3,
    hidden: int = 128,
    num_layers: int = 3,
    ode_steps: int = TARGET_ODE_STEPS,
    basin_weight: float = 0.1,
    seed: int = 0,
) -> ToyConsistencyModel:
    """Fit a ``ToyConsistencyModel`` to PF-ODE endpoints of the exact score.

    A pool of ``pool_size`` pairs (t ~ U{1..N-1}, x_t from the forward process; None: 16 per step, within
    [4096, 32768]) with their ``ode_steps``-step Heun endpoints is drawn once; ``steps`` AdamW steps (cosine decay) on
    minibatches of it minimize mean ||f - endpoint||^2 / s^2 + basin_weight * cross-entropy(total logits, the
    endpoint's most likely component). Deterministic for a seed (own generator; the global RNG is left untouched).
    Returns the frozen model in eval mode.
    """
    if steps < 1:
        raise ConfigError(f"consistency distillation steps={steps} must be >= 1")
    pool_size = pool_size or min(max(16 * steps, 4096), 32768)
    g = torch.Generator().manual_seed(seed)
    n_train = alphas_cumprod.shape[0]
    t = torch.randint(1, n_train, (pool_size,), generator=g)
    x = forward_process_pairs(mixture, alphas_cumprod, t, g)
    target = ode_targets(mixture, alphas_cumprod, x, t, ode_steps)
    basin = mixture.responsibilities(target).argmax(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyConsistencyModel(mixture, alphas_cumprod, hidden, num_layers)
    with torch.no_grad():  # the parameter-free parts of f on the pool, computed once (trained in float32)
        logits, flows, x_in, logit_scale, scale = (v.float() for v in model.features(x, t))
        target32 = target.float()
    m2 = float(model.second_moment)
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, pool_size, (batch_size,), generator=g)
        x0, total = model.combine(logits[i], flows[i], model.net(x_in[i], t[i]), logit_scale[i], scale[i])
        loss = ((x0 - target32[i]) ** 2).mean() / m2
        if basin_weight > 0:
            loss = loss + basin_weight * nn.functional.cross_entropy(total, basin[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---- files ----------------------------------------------------------------------------------------------------
def save_toy_consistency(model: ToyConsistencyModel, path: str, fingerprint: str, **info) -> None:
    """Write the network's weights with metadata {kind, arch, fingerprint, **info} (JSON values), atomically."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"kind": KIND, "arch": json.dumps(model.arch()), "fingerprint": fingerprint,
            **{k: json.dumps(v) for k, v in info.items()}}
    tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in model.net.state_dict().items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_toy_consistency(path: str, mixture: GaussianMixture, alphas_cumprod: torch.Tensor,
                         fingerprint: str) -> tuple[ToyConsistencyModel, dict]:
    """(frozen model, metadata) from a file of ``save_toy_consistency``; a ConfigError when it belongs to another
    mixture or schedule, or is no such file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ConfigError(f"consistency model file {path!r} is not a readable safetensors file ({exc}); delete it "
                          "to distill it anew") from exc
    if meta.get("kind") != KIND:
        raise ConfigError(f"{path!r} holds no toy consistency model (kind {meta.get('kind')!r}); point "
                          "task.consistency_path at another file (a missing one is distilled and written there)")
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(f"{path!r} was distilled for another mixture or schedule (fingerprint "
                          f"{meta.get('fingerprint', '?')[:12]}, this task {fingerprint[:12]}); delete it or point "
                          "task.consistency_path at another file to distill anew")
    arch = json.loads(meta["arch"])
    with torch.random.fork_rng(devices=[]):
        model = ToyConsistencyModel(mixture, alphas_cumprod, arch["hidden"], arch["num_layers"])
    model.net.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    decoded = {k: (json.loads(v) if k not in ("kind", "fingerprint") else v) for k, v in meta.items()}
    return model, decoded


def default_cache_path(task_name: str, fingerprint: str, steps: int) -> str:
    """~/.cache/sqdf/consistency/<task>-<fingerprint[:16]>-s<steps>.safetensors."""
    root = os.path.join(os.path.expanduser("~"), ".cache", "sqdf", "consistency")
    return os.path.join(root, f"{task_name}-{fingerprint[:16]}-s{steps}.safetensors")


def rmse_summary(mse: dict[int, float]) -> str:
    """'t=999: 0.12, t=500: 0.03' (root mean squared errors) for messages."""
    return ", ".join(f"t={t}: {math.sqrt(v):.3g}" for t, v in mse.items())
