"""A reward model learned from preferences as the training reward of a run, and ``sqdf reward-model``.

``trainer.reward_model=MODEL.safetensors`` makes every reward query during training the learned model's reward on
the task's ``proxy_features()`` (mean - ``trainer.reward_model_pessimism`` * ensemble std), while evaluations keep
scoring the task's true reward: over-optimization of the learned reward shows as ``learned_reward`` rising in the
eval rows while ``reward_mean`` (the true reward) stalls or falls. ``trainer.reward_model_trust`` also hands the
method PrefPaint's per-sample trust weights (``Rollout.weights``).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..preferences.data import PreferencePairs, load_pairs
from ..preferences.reward_model import PreferenceRewardModel
from .run_setup import default_config, make_task

_EVAL_CHUNK = 256


class LearnedReward:
    """``reward(x, cond) -> [B]`` = model mean - pessimism * model std (differentiable in x; parameters frozen)."""

    def __init__(self, model: PreferenceRewardModel, pessimism: float = 0.0):
        if not pessimism >= 0:
            raise ConfigError(f"trainer.reward_model_pessimism={pessimism} must be >= 0 (0: the ensemble mean)")
        self.model, self.pessimism = model, float(pessimism)

    def __call__(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.reward(x, cond, self.pessimism)

    def trust_weight(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """PrefPaint's weights [B] (``PreferenceRewardModel.trust_weight``), on x's device and dtype."""
        return self.model.trust_weight(x, cond).to(device=x.device, dtype=x.dtype)

    def summary(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, float]:
        """Mean learned reward and mean ensemble std of samples x (no gradients, in chunks)."""
        means, stds = [], []
        with torch.no_grad():
            for s in range(0, x.shape[0], _EVAL_CHUNK):
                c = None if cond is None else cond[s:s + _EVAL_CHUNK]
                r = self.model.member_rewards(x[s:s + _EVAL_CHUNK], c)
                means.append(r.mean(0))
                stds.append(self.model.spread(r))
        return {"learned_reward": float(torch.cat(means).mean()), "learned_reward_std": float(torch.cat(stds).mean())}


def load_learned_reward(path: str, task, device, pessimism: float = 0.0) -> LearnedReward:
    """The model at ``path`` on the task's feature map (checked against its sample shape), moved to ``device``."""
    model = PreferenceRewardModel.load(path, task.proxy_features(), tuple(task.sample_shape), device=device)
    return LearnedReward(model, pessimism)


def split_pairs(pairs: PreferencePairs, holdout: float, seed: int) -> tuple[PreferencePairs, PreferencePairs | None]:
    """(training pairs, held-out pairs or None): a seeded random ``holdout`` share (none for fewer than 10 pairs)."""
    n = len(pairs)
    k = int(round(holdout * n)) if n >= 10 else 0
    if k == 0:
        return pairs, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def take(idx):
        return PreferencePairs(pairs.a[idx], pairs.b[idx], pairs.labels[idx],
                               None if pairs.cond is None else pairs.cond[idx],
                               None if pairs.captions is None else [pairs.captions[i] for i in idx.tolist()])

    return take(perm[k:]), take(perm[:k])


def _quiet_load(path: str, sample_shape: tuple[int, ...]) -> PreferencePairs:
    """load_pairs without the datasets progress bars (a command's output stays its own report)."""
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    was_on = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        return load_pairs(path, sample_shape)
    finally:
        if was_on:
            enable_progress_bar()


def fit_reward_model(task_name: str, pairs: str | PreferencePairs, out: str, ensemble: int = 5, hidden: int = 64,
                     epochs: int = 300, seed: int = 0, temperature: float = 1.0, holdout: float = 0.1,
                     settings: dict | None = None, log=None) -> dict:
    """Fit a PreferenceRewardModel on ``pairs`` (PreferencePairs, or a .jsonl/.parquet path read with the task's
    sample shape) with the task's ``proxy_features()`` (``settings``: task.KEY values), holding out a seeded
    ``holdout`` share for the accuracy; write it to ``out`` and, when ``log`` is given, log(one-line report).
    Returns {path, pairs, heldout_pairs, train_accuracy, heldout_accuracy, feature_kind, feature_dim, message}."""
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout} must be in [0, 1)")
    config = default_config("sqdf", task_name)
    for key, value in (settings or {}).items():
        config.set(key, value)
    task = make_task(task_name, config.task)
    shape = tuple(task.sample_shape)
    source = pairs if isinstance(pairs, str) else "the given pairs"
    if isinstance(pairs, str):
        pairs = _quiet_load(pairs, shape)
    elif pairs.sample_shape != shape:
        raise ConfigError(f"preference pairs of samples of shape {pairs.sample_shape} for task {task_name}, whose "
                          f"samples have shape {shape}")
    train, held = split_pairs(pairs, holdout, seed)
    model = PreferenceRewardModel(task.proxy_features(), ensemble=ensemble, hidden=hidden, temperature=temperature,
                                  epochs=epochs, seed=seed).fit(train)
    result = {"path": out, "pairs": len(train), "heldout_pairs": 0 if held is None else len(held),
              "train_accuracy": model.accuracy(train),
              "heldout_accuracy": None if held is None else model.accuracy(held),
              "feature_kind": type(model.feature_map).__name__, "feature_dim": model.feature_dim}
    model.save(out, info={"task": task_name, "pairs_file": source, **{k: v for k, v in result.items() if k != "path"}})
    held_text = ("no held-out pairs" if held is None
                 else f"held-out accuracy {result['heldout_accuracy']:.4f} on {len(held)} pairs")
    result["message"] = (f"wrote a reward model of {task_name} ({ensemble} heads, hidden {hidden}, "
                         f"{result['feature_kind']} features of width {result['feature_dim']}) fit on {len(train)} "
                         f"pairs to {out}: train accuracy {result['train_accuracy']:.4f}, {held_text}")
    if log is not None:
        log(result["message"])
    return result
