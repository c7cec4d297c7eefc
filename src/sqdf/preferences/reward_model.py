"""Bradley-Terry reward models learned from preference pairs, for training any reward-based method on them.

``PreferenceRewardModel`` is ``features -> standardize -> an ensemble of K small MLP heads``: the feature map is a
task's ``proxy_features()`` (raw vectors for the toys, the digits classifier's features, CLIP embeddings for SD),
each head is fit on its own bootstrap resample of the pairs by the Bradley-Terry logistic loss

    P(a beats b) = sigmoid((r(a) - r(b)) / temperature),

ties (label 0.5) entering as soft targets (their loss is minimal at r(a) = r(b)). This is the reward model of
Gen-Drive's scene evaluator and of PrefPaint (PREFERENCES.md sections 7 and 8), on whatever features a task has.

Identifiability: a Bradley-Terry reward is known only up to an additive constant per condition (only differences
r(a) - r(b) of two samples under one condition are ever observed) and up to a scale set by the label temperature
(the fit reward is ``temperature`` times the logit; with the temperature the labels were drawn at, differences
come out in the labeller's units). Here each member is shifted so that its mean over the training samples is 0,
which fixes one constant per member (the ensemble spread then measures disagreement on differences, not arbitrary
offsets); per-condition constants stay arbitrary, which methods that normalize rewards per condition (DDPO's
advantages) do not see.

Like the black-box proxies (``sqdf.blackbox.proxy``, with which it shares ``sqdf.models.ensemble``) the model is
refit from scratch by ``fit``, deterministic given ``seed`` (its own generator; the global RNG is left alone) and
frozen afterwards: gradients flow to x, never into the parameters.
"""

from __future__ import annotations

import json
import math
import os
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.ensemble import EnsembleMLP, check_features, feature_matrix, ridge_inverse, standardization
from ..models.features import RawFeatures, as_feature_map
from .data import PreferencePairs

FORMAT = "sqdf-preference-reward-model"
VERSION = "1"
_CHUNK = 4096  # samples per evaluation chunk in accuracy / after fit


def bradley_terry_loss(margin: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-[y log sigmoid(m) + (1 - y) log sigmoid(-m)] per pair [N], for margins m = (r(a) - r(b)) / temperature and
    labels y in {0, 0.5, 1} (1: a won). Unlike ``labels.preference_loss`` a tie (y = 0.5) is kept, as a soft
    target whose loss is smallest at m = 0."""
    return F.binary_cross_entropy_with_logits(margin, labels.to(margin.dtype), reduction="none")


def _check(name: str, value, ok: bool, need: str) -> None:
    if not ok:
        raise ConfigError(f"reward model option {name}={value!r} must be {need}")


def _real(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _refit_hint(path: str) -> str:
    return (f"fit one on the task's preference pairs with `sqdf reward-model PAIRS.jsonl --task TASK --out {path}` "
            "(pairs from `sqdf pairs TASK`)")


class PreferenceRewardModel(nn.Module):
    """An ensemble of K MLP heads (2 hidden layers of ``hidden``, SiLU) on standardized features, fit by
    Bradley-Terry on preference pairs.

    Args:
        feature_map: a FeatureMap (or callable f(x, cond) -> [B, F]); a task's ``proxy_features()``.
        ensemble: heads K (>= 1); with K >= 2 each head is fit on its own bootstrap resample of the pairs, and
            ``std`` is their spread (K = 1: the plain pairs, std 0).
        hidden: MLP width.
        temperature: the label temperature tau of P(a > b) = sigmoid((r(a) - r(b)) / tau); the reward's scale.
        epochs, lr, weight_decay, batch_size: AdamW over ``epochs`` passes; at most ``batch_size`` pairs are fit
            full-batch.
        ridge: prior precision of PrefPaint's trust matrix V (``trust_weight``).
        seed: seeds the init, the bootstrap and the minibatch order.

    ``forward(x, cond)`` is the ensemble-mean reward [B], differentiable in x; ``std`` the ensemble std;
    ``reward(x, cond, pessimism)`` = mean - pessimism * std.
    """

    def __init__(self, feature_map, ensemble: int = 5, hidden: int = 64, temperature: float = 1.0,
                 epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-4, batch_size: int = 512,
                 ridge: float = 1.0, seed: int = 0):
        super().__init__()
        _check("ensemble", ensemble, isinstance(ensemble, Integral) and ensemble >= 1, "an int >= 1 (heads)")
        _check("hidden", hidden, isinstance(hidden, Integral) and hidden >= 1, "an int >= 1 (MLP width)")
        _check("temperature", temperature, _real(temperature) and temperature > 0,
               "> 0 (the Bradley-Terry label temperature; labels drawn at temperature 0 fit best at a small one, "
               "e.g. 0.1)")
        _check("epochs", epochs, isinstance(epochs, Integral) and epochs >= 1, "an int >= 1 (passes over the pairs)")
        _check("lr", lr, _real(lr) and lr > 0, "> 0 (Adam learning rate)")
        _check("weight_decay", weight_decay, _real(weight_decay) and weight_decay >= 0, ">= 0")
        _check("batch_size", batch_size, isinstance(batch_size, Integral) and batch_size >= 1,
               "an int >= 1 (pairs per minibatch)")
        _check("ridge", ridge, _real(ridge) and ridge > 0, "> 0 (the prior precision keeps V invertible)")
        self.feature_map = as_feature_map(feature_map)
        self.ensemble, self.hidden, self.temperature = int(ensemble), int(hidden), float(temperature)
        self.epochs, self.lr, self.weight_decay = int(epochs), float(lr), float(weight_decay)
        self.batch_size, self.ridge, self.seed = int(batch_size), float(ridge), int(seed)
        self.heads: EnsembleMLP | None = None
        self.fitted = False
        self.num_pairs = 0
        self.sample_shape: tuple[int, ...] | None = None
        self.source: str | None = None  # the file it was loaded from, for error messages

    # ---- features --------------------------------------------------------------------------------------------
    @property
    def feature_dim(self) -> int:
        return int(self.f_mean.shape[0])

    def _z(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Standardized features [B, F] in the model's dtype (differentiable in x)."""
        if not self.fitted:
            raise ConfigError("this reward model has not been fit; call fit(pairs) or PreferenceRewardModel.load")
        f = check_features(self.feature_map(x, cond), x.shape[0])
        if f.shape[1] != self.feature_dim:
            where = f"reward model {self.source!r}" if self.source else "this reward model"
            raise ConfigError(f"the feature map returned {f.shape[1]} features but {where} was fit on "
                              f"{self.feature_dim}; use the task (and sample shape) it was fit on, or "
                              f"{_refit_hint(self.source or 'MODEL.safetensors')}")
        return (f.to(self.f_mean.dtype) - self.f_mean) / self.f_std

    # ---- fitting ---------------------------------------------------------------------------------------------
    def fit(self, pairs: PreferencePairs) -> "PreferenceRewardModel":
        """Refit from scratch on ``pairs`` (a, b [N, *shape], labels [N], cond [N, ...] or None, shared by a and
        b); freezes the parameters and returns self."""
        if not isinstance(pairs, PreferencePairs):
            raise ConfigError(f"fit takes PreferencePairs (sqdf.preferences.load_pairs); got {type(pairs).__name__}")
        n = len(pairs)
        if n < 2:
            raise ConfigError(f"a reward model needs at least 2 preference pairs; got {n}")
        if bool((pairs.labels == 0.5).all()):
            raise ConfigError(f"all {n} preference pairs are ties; a reward model needs pairs with a winner")
        dtype = torch.float64 if pairs.a.dtype == torch.float64 else torch.float32
        f_a = feature_matrix(self.feature_map, pairs.a, pairs.cond, dtype)
        f_b = feature_matrix(self.feature_map, pairs.b, pairs.cond, dtype)
        f_mean, f_std = standardization(torch.cat([f_a, f_b]))
        self.register_buffer("f_mean", f_mean)
        self.register_buffer("f_std", f_std)
        z_a, z_b = (f_a - f_mean) / f_std, (f_b - f_mean) / f_std
        y = pairs.labels.to(device=z_a.device, dtype=dtype)
        gen = torch.Generator().manual_seed(self.seed)
        self.heads = EnsembleMLP(self.ensemble, z_a.shape[1], self.hidden, dtype, z_a.device, gen)
        if self.ensemble > 1:
            boot = torch.randint(n, (self.ensemble, n), generator=gen).to(z_a.device)  # [K, N] resampled pairs
        else:
            boot = torch.arange(n, device=z_a.device)[None]
        opt = torch.optim.AdamW(self.heads.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.epochs):
                batches = [None] if n <= self.batch_size else torch.randperm(n, generator=gen).split(self.batch_size)
                for idx in batches:
                    rows = boot if idx is None else boot[:, idx.to(z_a.device)]
                    margin = self.heads(z_a[rows]) - self.heads(z_b[rows])  # [K, b], in units of the temperature
                    # summed over members: each head gets the gradient of its own mean loss
                    loss = bradley_terry_loss(margin, y[rows]).mean(1).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self.fit_loss = float(loss.detach()) / self.ensemble
        for q in self.heads.parameters():
            q.grad = None
        self.heads.requires_grad_(False)
        z = torch.cat([z_a, z_b])
        with torch.no_grad():
            u = torch.cat([self.heads(z[s:s + _CHUNK]) for s in range(0, z.shape[0], _CHUNK)], dim=1)  # [K, 2N]
            self.register_buffer("offset", u.mean(1))
            phi = torch.cat([self._phi_z(z[s:s + _CHUNK]) for s in range(0, z.shape[0], _CHUNK)])
            self.register_buffer("v_inv", ridge_inverse(phi, self.ridge))
        self.eval()
        self.fitted, self.num_pairs, self.sample_shape = True, n, pairs.sample_shape
        return self

    # ---- rewards ---------------------------------------------------------------------------------------------
    def member_rewards(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Each head's reward [K, B] (centered on the training samples, in the labeller's units)."""
        return self.temperature * (self.heads(self._z(x, cond)) - self.offset[:, None])

    @staticmethod
    def spread(r: torch.Tensor) -> torch.Tensor:
        """The std [B] across members of member rewards r [K, B] (0 for K = 1)."""
        if r.shape[0] < 2:
            return torch.zeros_like(r[0])
        return torch.sqrt(r.var(0, correction=1) + 1e-12)  # eps keeps the gradient finite at 0 spread

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble-mean reward [B]; differentiable in x."""
        return self.member_rewards(x, cond).mean(0)

    def std(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble std [B] of the members' rewards (0 for a single head)."""
        return self.spread(self.member_rewards(x, cond))

    def reward(self, x: torch.Tensor, cond: torch.Tensor | None = None, pessimism: float = 0.0) -> torch.Tensor:
        """mean - pessimism * std [B]: the pessimistic (lower-confidence) reward, a remedy for over-optimizing a
        learned reward where the members disagree; pessimism 0 is ``forward``."""
        r = self.member_rewards(x, cond)
        mean = r.mean(0)
        return mean if pessimism == 0 else mean - pessimism * self.spread(r)

    def accuracy(self, pairs: PreferencePairs) -> float:
        """Share of the decided pairs (ties left out) whose winner has the higher mean reward; NaN if none."""
        keep = pairs.labels != 0.5
        if not bool(keep.any()):
            return float("nan")
        a, b, y = pairs.a[keep], pairs.b[keep], pairs.labels[keep]
        cond = None if pairs.cond is None else pairs.cond[keep]
        with torch.no_grad():
            diffs = []
            for s in range(0, a.shape[0], _CHUNK):
                c = None if cond is None else cond[s:s + _CHUNK]
                diffs.append(self(a[s:s + _CHUNK], c) - self(b[s:s + _CHUNK], c))
            d = torch.cat(diffs)
        return float(((d > 0) == (y.to(d.device) == 1)).double().mean())

    # ---- PrefPaint's trust weight ----------------------------------------------------------------------------
    def _phi_z(self, z: torch.Tensor) -> torch.Tensor:
        h = self.heads.hidden_features(z)  # [K, B, H]
        return h.permute(1, 0, 2).reshape(z.shape[0], -1)

    def phi(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layers of all K heads side by side, [B, K*H]: the ensemble-mean reward is linear in them
        (PrefPaint's reward is w . f on its last layer f), so they play the role of f."""
        return self._phi_z(self._z(x, cond))

    def bound(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """sqrt(phi^T V^-1 phi) [B] with V = ridge*I + Phi^T Phi over the training samples (float64)."""
        phi = self.phi(x, cond).to(torch.float64)
        quad = ((phi @ self.v_inv) * phi).sum(-1).clamp_min(0)
        return torch.sqrt(quad)

    def trust_weight(self, x: torch.Tensor, cond: torch.Tensor | None = None, a: float = 0.05, b: float = 0.7,
                     lo: float = 1.0, hi: float = 2.21) -> torch.Tensor:
        """PrefPaint's per-sample weight [B] = clamp(exp(-a * bound(x) + b), lo, hi), detached (PrefPaint's
        constants: samples the reward model knows well get up to e^b ~ 2x weight, uncertain ones weight lo).

        PrefPaint's code computes ||f V^-1||_2 = sqrt(f^T V^-2 f) (unless its stored matrix is V^-1/2); we use the
        textbook linear-bandit width sqrt(f^T V^-1 f)."""
        with torch.no_grad():
            w = torch.exp(-a * self.bound(x, cond) + b).clamp(lo, hi)
        return w.to(self.f_mean.dtype)

    # ---- files -----------------------------------------------------------------------------------------------
    def save(self, path: str, info: dict | None = None) -> str:
        """Write the fitted model to ``path`` (safetensors: parameters, standardization stats f_mean/f_std, member
        offsets, V^-1; metadata: feature kind and dim, ensemble size, hidden, temperature, ridge, sample shape and
        ``info``), to a temporary name first and moved into place. Returns path."""
        from safetensors.torch import save_file

        if not self.fitted:
            raise ConfigError("this reward model has not been fit; call fit(pairs) before save")
        tensors = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        tensors.update(f_mean=self.f_mean, f_std=self.f_std, offset=self.offset, v_inv=self.v_inv)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"format": FORMAT, "version": VERSION, "feature_kind": type(self.feature_map).__name__,
                "feature_dim": str(self.feature_dim), "ensemble": str(self.ensemble), "hidden": str(self.hidden),
                "temperature": repr(self.temperature), "ridge": repr(self.ridge), "seed": str(self.seed),
                "epochs": str(self.epochs), "lr": repr(self.lr), "weight_decay": repr(self.weight_decay),
                "batch_size": str(self.batch_size), "num_pairs": str(self.num_pairs),
                "sample_shape": json.dumps(list(self.sample_shape or ())),
                "standardization": "tensors f_mean, f_std", "info": json.dumps(info or {})}
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str, feature_map, sample_shape: tuple[int, ...] | None = None,
             device=None) -> "PreferenceRewardModel":
        """A model written by ``save``, on ``feature_map`` (the same kind and width it was fit on; checked here
        when the map declares its dim, or is RawFeatures and ``sample_shape`` is given, else at the first call)."""
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise ConfigError(f"reward model file {path!r} does not exist; {_refit_hint(path)}")
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
            raise ConfigError(f"reward model file {path!r} is not a readable safetensors file ({e}); it may be "
                              f"truncated: {_refit_hint(path)}") from e
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{path!r} is a safetensors file but not a reward model of PreferenceRewardModel.save "
                              f"(metadata format={meta.get('format')!r}); {_refit_hint(path)}")
        needed = ("heads.w1", "heads.b1", "heads.w2", "heads.b2", "heads.w3", "heads.b3", "f_mean", "f_std",
                  "offset", "v_inv")
        missing = [k for k in needed if k not in tensors]
        try:
            if missing:
                raise KeyError(", ".join(missing))
            k, h, dim = int(meta["ensemble"]), int(meta["hidden"]), int(meta["feature_dim"])
            shape = tuple(json.loads(meta["sample_shape"]))
            model = cls(feature_map, ensemble=k, hidden=h, temperature=float(meta["temperature"]),
                        epochs=int(meta["epochs"]), lr=float(meta["lr"]), weight_decay=float(meta["weight_decay"]),
                        batch_size=int(meta["batch_size"]), ridge=float(meta["ridge"]), seed=int(meta["seed"]))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"reward model file {path!r} lacks {e} or holds a bad value; {_refit_hint(path)}") from e
        kind = type(model.feature_map).__name__
        if kind != meta.get("feature_kind"):
            raise ConfigError(f"reward model {path!r} was fit on {meta.get('feature_kind')} features, but this "
                              f"task's feature map is {kind}; use it with the task it was fit on, or "
                              f"{_refit_hint(path)}")
        have = getattr(model.feature_map, "dim", None)
        if have is None and isinstance(model.feature_map, RawFeatures) and sample_shape is not None:
            have = math.prod(sample_shape) + (model.feature_map.num_classes or 0)
        if have is not None and have != dim:
            raise ConfigError(f"reward model {path!r} was fit on {kind} features of width {dim}, but this task's "
                              f"feature map gives {have}; use it with the task it was fit on, or {_refit_hint(path)}")
        if sample_shape is not None and shape and tuple(sample_shape) != shape:
            raise ConfigError(f"reward model {path!r} was fit on samples of shape {shape}, but the task's samples "
                              f"have shape {tuple(sample_shape)}; {_refit_hint(path)}")
        w1 = tensors["heads.w1"]
        if tuple(w1.shape) != (k, dim, h) or tuple(tensors["v_inv"].shape) != (k * h, k * h):
            raise ConfigError(f"reward model file {path!r}: its tensors do not match its metadata (ensemble {k}, "
                              f"hidden {h}, features {dim}); {_refit_hint(path)}")
        model.heads = EnsembleMLP(k, dim, h, w1.dtype)
        model.heads.load_state_dict({n[len("heads."):]: t for n, t in tensors.items() if n.startswith("heads.")})
        model.heads.requires_grad_(False)
        for name in ("f_mean", "f_std", "offset", "v_inv"):
            model.register_buffer(name, tensors[name])
        model.fitted, model.num_pairs, model.sample_shape = True, int(meta.get("num_pairs", 0)), shape or None
        model.source, model.info = path, json.loads(meta.get("info", "{}"))
        model.eval()
        return model.to(device) if device is not None else model
