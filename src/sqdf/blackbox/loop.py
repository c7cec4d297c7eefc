"""The online black-box loop (SEIKO-style; SQDF's second experiment), with any method as the inner optimizer.

Each round: sample fresh chains from the current policy, ask the oracle for their (noisy) rewards, refit a
differentiable proxy on every label bought so far, reset the method's replay buffer, fine-tune on the proxy for
``inner_steps`` iterations, and measure the TRUE reward (noise-free, not charged) of the policy's samples with its
path KL, regret and the task's diversity metrics. Round sizes grow as the paper's 1024/2048/4096/8192 (shares
1:2:4:8 of the budget by default). A run directory holds ``blackbox.yaml``, ``blackbox.jsonl`` (one row per round),
``oracle/`` (the query log), ``inner/`` (the inner Trainer's files) and ``checkpoints/`` (one per round);
``BlackboxRun.resume(DIR)`` continues after a kill, answering re-drawn samples from the oracle log (no label is
bought twice).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import yaml

from ..checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from ..config import RunConfig, option
from ..errors import ConfigError
from ..metrics import objective_terms
from .oracle import Oracle


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


def _read_saved(out_dir: str) -> dict:
    """The blackbox.yaml of a run directory, with a clear error where there is none."""
    from ..errors import CheckpointError

    path = os.path.join(out_dir, "blackbox.yaml")
    if not os.path.exists(path):
        raise CheckpointError(f"{out_dir!r} has no blackbox.yaml, so it is not a `sqdf blackbox` run directory")
    with open(path) as fh:
        return yaml.safe_load(fh)


def _saved_run(out_dir: str) -> tuple:
    """(task name, method name, inner RunConfig, BlackboxConfig) of a black-box run directory."""
    from ..trainer import read_run_config

    saved = _read_saved(out_dir)
    _, _, run_config = read_run_config(os.path.join(out_dir, "inner"))
    return saved["task_name"], saved["method_name"], run_config, BlackboxConfig(**saved["blackbox"])


def plot_rounds(rows: list[dict], out_dir: str, title: str) -> None:
    """DIR/blackbox.png: true reward, path KL, regret and the task's metrics against oracle queries spent."""
    from ..plotting import plot_curves

    plot_curves([{**r, "reward_queries": r["queries"]} for r in rows], os.path.join(out_dir, "blackbox.png"), title,
                xlabel="oracle queries")


def task_features(task):
    """The proxy's input features for a task (``Task.proxy_features``): the raw sample vector for the toy tasks,
    the shipped classifier's penultimate features for digits, CLIP image embeddings for the text-to-image tasks."""
    return task.proxy_features()


class BlackboxRun:
    """One black-box optimization run: an oracle, a proxy refit each round, and an inner Trainer."""

    def __init__(self, task_name: str, method_name: str, run_config: RunConfig, bb: BlackboxConfig, out_dir: str):
        from ..trainer import Trainer

        bb.validate()
        self.bb, self.out_dir = bb, out_dir
        self.task_name, self.method_name = task_name, method_name
        self.proxy = None
        self.trainer = Trainer(task_name, method_name, run_config, os.path.join(out_dir, "inner"),
                               training_reward=self._proxy_reward)
        self.task = self.trainer.task
        self.oracle = Oracle(self._true_reward, bb.budget, bb.noise_std, bb.seed, os.path.join(out_dir, "oracle"),
                             bb.workers)
        self.generator = torch.Generator(device=self.trainer.device).manual_seed(bb.seed * 7919 + 13)
        self.round = 0

    # ---- rewards ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _true_reward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.task.reward(x.to(self.trainer.device), None if cond is None else cond.to(self.trainer.device))

    def _proxy_reward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        if self.proxy is None:
            raise ConfigError("the proxy is used before any oracle label was bought")
        return self.proxy(x, cond)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        os.makedirs(self.out_dir, exist_ok=True)
        if self.round == 0:
            self._write_config()
            self._log({"round": 0, "queries": self.oracle.spent, **self.evaluate()}, truncate=True)
        sizes = self.bb.round_sizes()
        while self.round < len(sizes):
            self._round(sizes[self.round])
            self.round += 1
            self._log({"round": self.round, "queries": self.oracle.spent, **self.evaluate(),
                       **self._proxy_fit()})
            save_checkpoint(self.out_dir, self.round, self.state(), keep=2)
        rows = self.rows()
        plot_rounds(rows, self.out_dir, f"{self.method_name} on {self.task_name}: proxy loop, budget {self.bb.budget}")
        return rows

    def _round(self, n: int) -> None:
        policy = self.trainer.policy
        cond = self.task.sample_conditions(n, self.generator)
        policy.eval()
        with torch.no_grad():
            x = policy.sample(n, cond, self.generator, with_reference=False).samples
        self.oracle(x, cond)
        self._refit()
        reset = getattr(self.trainer.method, "reset_buffer", None)
        if reset is not None:
            reset()
        self.trainer.config.trainer.steps = self.trainer.iteration + self.bb.inner_steps
        self.trainer.train()

    def _refit(self) -> None:
        from .proxy import make_proxy

        data = self.oracle.logged()
        options = {"optimism": self.bb.optimism} if self.bb.proxy == "ensemble" else {"bonus": self.bb.bonus}
        proxy = make_proxy(self.bb.proxy, task_features(self.task), seed=self.bb.seed, **options)
        device = self.trainer.device
        cond = data.get("cond")
        proxy.fit(data["x"].to(device), None if cond is None else cond.to(device),
                  data["values"].to(torch.float32).to(device))
        self.proxy = proxy.to(device)

    @torch.no_grad()
    def _proxy_fit(self) -> dict:
        """How well the proxy tracks the true reward on the labels bought (RMSE against the noise-free reward)."""
        data = self.oracle.logged()
        device = self.trainer.device
        x = data["x"][-512:].to(device)
        cond = data.get("cond")
        cond = None if cond is None else cond[-512:].to(device)
        err = self.proxy.predict(x, cond)[0] - self._true_reward(x, cond)
        return {"proxy_rmse": float(err.pow(2).mean().sqrt())}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """True (noise-free, uncharged) reward of the policy's samples, path KL, J, regret and task metrics."""
        n = self.bb.eval_samples
        g = torch.Generator(device=self.trainer.device).manual_seed(self.bb.seed * 1_000_003 + 7919)
        cond = self.task.sample_conditions(n, g)
        self.trainer.policy.eval()
        traj = self.trainer.policy.sample(n, cond, g)
        rewards = self._true_reward(traj.samples, cond)
        out = objective_terms(rewards, traj.path_kl, self.task.alpha)
        opt = self.task.known_optimum()
        if opt is not None:
            out["optimum"], out["regret"] = opt.optimum, opt.optimum - out["objective"]
        out.update(self.task.evaluate(traj.samples, cond))
        return out

    # ---- state --------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"iteration": self.round, "round": self.round, "trainer": self.trainer.state(),
                "generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        self.round = int(state["round"])
        self.trainer.load_state(state["trainer"])
        self.generator.set_state(state["generator"].cpu())
        if self.round > 0:
            self._refit()

    @classmethod
    def resume(cls, out_dir: str) -> "BlackboxRun":
        """Continue a run from its newest round checkpoint; labels bought after it are answered from the log."""
        run = cls(*_saved_run(out_dir), out_dir)
        if not list_checkpoints(out_dir):  # killed before the first round ended: start over (labels are kept)
            return run
        _, state, _ = load_latest_checkpoint(out_dir)
        run.load_state(state)
        run._truncate(run.round)
        return run

    # ---- files --------------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        data = {"task_name": self.task_name, "method_name": self.method_name,
                "blackbox": dataclasses.asdict(self.bb)}
        with open(os.path.join(self.out_dir, "blackbox.yaml"), "w") as fh:
            yaml.safe_dump(data, fh, sort_keys=False)

    def _rows_path(self) -> str:
        return os.path.join(self.out_dir, "blackbox.jsonl")

    def _log(self, row: dict, truncate: bool = False) -> None:
        with open(self._rows_path(), "w" if truncate else "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        with open(self._rows_path()) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def _truncate(self, round_done: int) -> None:
        keep = [r for r in self.rows() if r["round"] <= round_done]
        with open(self._rows_path(), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in keep)


def resume_run(out_dir: str):
    """Continue a killed `sqdf blackbox` run of any kind (proxy loop, --direct or --best-of) from its directory."""
    from .baselines import BestOfNRun, DirectRun

    saved = _read_saved(out_dir)
    if saved.get("best_of") is not None:
        return BestOfNRun.resume(out_dir)
    return (DirectRun if saved.get("direct") else BlackboxRun).resume(out_dir)
