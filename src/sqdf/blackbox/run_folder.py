"""What a `sqdf blackbox` run folder holds, shared by every kind of run (proxy loop, --direct, --best-of):
the outer-loop config (``BlackboxConfig``), ``blackbox.yaml`` (the kind of run and its settings), ``blackbox.jsonl``
(one row per round or evaluation), ``blackbox.png``, and the inner run's saved config under ``inner/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import yaml

from ..config import option
from ..errors import ConfigError


@dataclass
class BlackboxConfig:
    """The outer loop of `sqdf blackbox` (the inner method's settings stay in the usual config sections)."""

    budget: int = option(1024, "oracle queries in all: a hard limit")
    round_shares: str = option("1,2,4,8", "how the budget is split over rounds, e.g. '1,2,4,8' (the paper's "
                               "1024/2048/4096/8192)")
    noise_std: float = option(0.1, "std of the oracle's Gaussian observation noise")
    proxy: str = option("ensemble", "'ensemble' (bootstrap MLP heads) or 'ucb' (MLP + UCB bonus)")
    optimism: float = option(0.0, "ensemble: fine-tune on mean + optimism * std")
    bonus: float = option(1.0, "ucb: weight of the exploration bonus")
    inner_steps: int = option(50, "fine-tuning iterations on the proxy per round")
    eval_samples: int = option(512, "samples of each round's true-reward evaluation")
    workers: int = option(0, "oracle threads (0: ask in the main thread)")
    seed: int = option(0, "seed of the oracle noise and the query draws")

    def round_sizes(self) -> list[int]:
        try:
            shares = [float(v) for v in self.round_shares.split(",") if v.strip()]
        except ValueError as exc:
            raise ConfigError(f"round_shares={self.round_shares!r} must be comma-separated numbers like 1,2,4,8") from exc
        if not shares or any(s <= 0 for s in shares):
            raise ConfigError(f"round_shares={self.round_shares!r} must be positive numbers like 1,2,4,8")
        total = sum(shares)
        sizes = [int(self.budget * s / total) for s in shares]
        sizes[-1] += self.budget - sum(sizes)
        if min(sizes) < 2:
            raise ConfigError(f"budget={self.budget} split by {self.round_shares} gives a round of {min(sizes)} "
                              "queries; a proxy needs at least 2 labels per round: raise the budget or use fewer rounds")
        return sizes

    def validate(self) -> None:
        if self.budget < 4:
            raise ConfigError(f"budget={self.budget} must be >= 4 oracle queries")
        if self.inner_steps < 1 or self.eval_samples < 2:
            raise ConfigError("inner_steps must be >= 1 and eval_samples >= 2")
        if self.proxy not in ("ensemble", "ucb"):
            raise ConfigError(f"proxy={self.proxy!r} must be 'ensemble' or 'ucb'")
        self.round_sizes()


def read_saved(out_dir: str) -> dict:
    """The blackbox.yaml of a run directory, with a clear error where there is none."""
    from ..errors import CheckpointError

    path = os.path.join(out_dir, "blackbox.yaml")
    if not os.path.exists(path):
        raise CheckpointError(f"{out_dir!r} has no blackbox.yaml, so it is not a `sqdf blackbox` run directory")
    with open(path) as fh:
        return yaml.safe_load(fh)


def saved_run(out_dir: str) -> tuple:
    """(task name, method name, inner RunConfig, BlackboxConfig) of a black-box run directory."""
    from ..training.run_setup import read_run_config

    saved = read_saved(out_dir)
    _, _, run_config = read_run_config(os.path.join(out_dir, "inner"))
    return saved["task_name"], saved["method_name"], run_config, BlackboxConfig(**saved["blackbox"])


def plot_rounds(rows: list[dict], out_dir: str, title: str) -> None:
    """DIR/blackbox.png: true reward, path KL, regret and the task's metrics against oracle queries spent."""
    from ..evaluation.plots import plot_curves

    plot_curves([{**r, "reward_queries": r["queries"]} for r in rows], os.path.join(out_dir, "blackbox.png"), title,
                xlabel="oracle queries")


def task_features(task):
    """The proxy's input features for a task (``Task.proxy_features``): the raw sample vector for the toy tasks,
    the shipped classifier's penultimate features for digits, CLIP image embeddings for the text-to-image tasks."""
    return task.proxy_features()


def write_saved(out_dir: str, task_name: str, method_name: str, bb: BlackboxConfig, **extra) -> None:
    """DIR/blackbox.yaml: what kind of run this is (task, method, extra keys such as direct or best_of) and its
    BlackboxConfig."""
    os.makedirs(out_dir, exist_ok=True)
    data = {"task_name": task_name, "method_name": method_name, **extra, "blackbox": dataclasses.asdict(bb)}
    with open(os.path.join(out_dir, "blackbox.yaml"), "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def write_rows(out_dir: str, rows: list[dict]) -> None:
    """DIR/blackbox.jsonl, all rows at once, atomically."""
    path = os.path.join(out_dir, "blackbox.jsonl")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)
