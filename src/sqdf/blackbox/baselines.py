"""The rivals of the proxy loop at the same oracle budget: a method trained on the oracle itself (``DirectRun``,
``sqdf blackbox --direct``) and best-of-N selection by the oracle's labels (``BestOfNRun``, ``--best-of N``).

Both write the same files as the proxy loop (``blackbox.yaml``, ``blackbox.jsonl`` with one row per evaluation:
``queries`` spent and the TRUE reward of the outputs, path KL, J, regret and the task's metrics; ``oracle/`` the
query log; ``blackbox.png``), so the three kinds compare row for row.
"""

from __future__ import annotations

import json
import os

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..evaluation.metrics import objective_terms
from ..training.checkpoint import list_checkpoints, load_latest_checkpoint
from .oracle import Oracle
from .run_folder import BlackboxConfig, plot_rounds, read_saved, saved_run, write_rows, write_saved

MIN_METRIC_OUTPUTS = 32  # fewer winners than this get reward, KL and regret only


class DirectRun:
    """A rival's baseline on the same budget: the method trains on the (noisy, budgeted, logged) oracle itself, no
    proxy; the true reward is evaluated each time another ``budget / evaluations`` queries are spent."""

    def __init__(self, task_name: str, method_name: str, run_config: RunConfig, bb: BlackboxConfig, out_dir: str,
                 evaluations: int = 8):
        from ..training.run_setup import method_class
        from ..training.trainer import Trainer

        bb.validate()
        if not method_class(method_name).trains:
            raise ConfigError(f"--direct trains the method on the oracle; {method_name} does not train (use "
                              "--best-of N for best-of-N selection)")
        batch = run_config.method.batch_size
        if bb.budget % batch:
            raise ConfigError(f"--direct: budget={bb.budget} must be a multiple of method.batch_size={batch} (each "
                              "iteration buys one batch of labels and the budget is a hard limit)")
        self.bb, self.out_dir = bb, out_dir
        self.task_name, self.method_name = task_name, method_name
        run_config.update({"trainer": {"max_queries": bb.budget, "steps": 10**9, "eval_every": 0,
                                       "checkpoint_every": 1,  # every batch of labels bought is checkpointed
                                       "eval_samples": bb.eval_samples,
                                       "eval_every_queries": max(batch, bb.budget // evaluations // batch * batch)}})
        self.oracle = None
        self.trainer = Trainer(task_name, method_name, run_config, os.path.join(out_dir, "inner"),
                               training_reward=self._oracle)
        self.oracle = Oracle(self._true_reward, bb.budget, bb.noise_std, bb.seed, os.path.join(out_dir, "oracle"),
                             bb.workers)

    @torch.no_grad()
    def _true_reward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.trainer.task.reward(x, cond)

    def _oracle(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.oracle(x, cond).to(x.device)

    def run(self) -> list[dict]:
        write_saved(self.out_dir, self.task_name, self.method_name, self.bb, direct=True)
        self.trainer.train()
        rows = self.rows()
        plot_rounds(rows, self.out_dir, f"{self.method_name} on {self.task_name}: oracle directly, "
                    f"budget {self.bb.budget}")
        return rows

    def rows(self) -> list[dict]:
        """The inner run's evaluations as rounds: queries spent, true reward, path KL, J, regret, task metrics."""
        with open(os.path.join(self.out_dir, "inner", "metrics.jsonl")) as fh:
            evals = [json.loads(line) for line in fh if '"eval"' in line]
        rows = [{"round": i, "queries": r["reward_queries"], **{k: v for k, v in r.items() if k not in
                 ("iteration", "kind", "reward_queries", "wall_seconds")}} for i, r in enumerate(evals)]
        write_rows(self.out_dir, rows)
        return rows

    @classmethod
    def resume(cls, out_dir: str) -> "DirectRun":
        run = cls(*saved_run(out_dir), out_dir)
        if list_checkpoints(os.path.join(out_dir, "inner")):
            _, state, _ = load_latest_checkpoint(os.path.join(out_dir, "inner"))
            run.trainer.load_state(state)
        return run


def group_boundaries(round_sizes: list[int], n: int) -> list[int]:
    """Cumulative number of complete groups of n after each round: floor(cumsum(sizes) / n), [rounds]."""
    out, total = [], 0
    for size in round_sizes:
        total += size
        out.append(total // n)
    return out


class BestOfNRun:
    """Best-of-N at the same oracle budget: the budget labels fresh samples of the base model in groups of N that
    share one condition; the outputs are each group's winner by its NOISY label, so ``budget // N`` outputs in all.

    After each round (the proxy loop's shares) the winners of the complete groups so far are scored with the true
    reward (noise-free, not charged); the task's sample-set metrics are added once there are 32 winners. Their KL to the base is log N - (N - 1) / N (exact for a continuous label).
    Every draw is a function of the seed, so a killed run is resumed by running it again: the re-drawn samples are
    answered from the oracle's log and no label is bought twice.
    """

    def __init__(self, task_name: str, run_config: RunConfig, bb: BlackboxConfig, out_dir: str, n: int = 8):
        from ..training.trainer import Trainer

        bb.validate()
        if n < 2:
            raise ConfigError(f"--best-of {n} must be >= 2 (candidates per output)")
        sizes = bb.round_sizes()
        if min(group_boundaries(sizes, n)) < 1:
            raise ConfigError(f"--best-of {n}: the first round buys {sizes[0]} labels, fewer than one group of {n}; "
                              "raise the budget, lower N or give the first round a larger share")
        self.bb, self.out_dir, self.n = bb, out_dir, int(n)
        self.task_name, self.method_name = task_name, "best_of_n"
        run_config.update({"method": {"n": self.n}, "trainer": {"seed": bb.seed}})
        self.trainer = Trainer(task_name, "best_of_n", run_config, os.path.join(out_dir, "inner"))
        self.task, self.policy = self.trainer.task, self.trainer.policy
        self.oracle = Oracle(self._true_reward, bb.budget, bb.noise_std, bb.seed, os.path.join(out_dir, "oracle"),
                             bb.workers)

    @torch.no_grad()
    def _true_reward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        return self.task.reward(x, cond)

    @torch.no_grad()
    def run(self) -> list[dict]:
        from ..methods.best_of_n import best_of_n_kl, pick_best

        write_saved(self.out_dir, self.task_name, self.method_name, self.bb, best_of=self.n)
        os.makedirs(self.trainer.out_dir, exist_ok=True)
        self.trainer.write_config()  # the base model's settings, read back by resume
        device, n = self.trainer.device, self.n
        bounds = group_boundaries(self.bb.round_sizes(), n)
        g = torch.Generator(device=device).manual_seed(self.bb.seed * 7919 + 17)
        group_cond = self.task.sample_conditions(bounds[-1], g)
        self.policy.eval()
        samples, labels, rows, start = [], [], [], 0
        for r, stop in enumerate(bounds, 1):
            cond = None if group_cond is None else group_cond[start:stop].to(device).repeat_interleave(n, dim=0)
            gr = torch.Generator(device=device).manual_seed(self.bb.seed * 1_000_003 + r)
            x = self.policy.sample((stop - start) * n, cond, gr, with_reference=False).samples
            labels.append(self.oracle(x, cond))
            samples.append(x)
            start = stop
            rows.append({"round": r, "queries": stop * n, **self._evaluate(
                torch.cat(samples), torch.cat(labels), group_cond, stop, best_of_n_kl(n), pick_best)})
        write_rows(self.out_dir, rows)
        plot_rounds(rows, self.out_dir, f"best-of-{n} on {self.task_name}: oracle labels, budget {self.bb.budget}")
        return rows

    def _evaluate(self, x, labels, group_cond, groups: int, kl: float, pick_best) -> dict:
        best = pick_best(labels.to(x.device), self.n)
        winners = x[best]
        cond = None if group_cond is None else group_cond[:groups].to(x.device)
        out = objective_terms(self._true_reward(winners, cond), torch.full((groups,), kl, dtype=torch.float64),
                              self.task.alpha)
        opt = self.task.known_optimum()
        if opt is not None:
            out["optimum"], out["regret"] = opt.optimum, opt.optimum - out["objective"]
        out["outputs"] = groups
        if groups >= MIN_METRIC_OUTPUTS:  # sample-based metrics (mode TV, kNN KL, Frechet) need a sample set
            out.update(self.task.evaluate(winners, cond))
        return out

    @classmethod
    def resume(cls, out_dir: str) -> "BestOfNRun":
        """Run again from the start: every draw repeats, and the oracle answers the paid-for ones from its log."""
        from ..training.run_setup import read_run_config

        saved = read_saved(out_dir)
        _, _, run_config = read_run_config(os.path.join(out_dir, "inner"))
        return cls(saved["task_name"], run_config, BlackboxConfig(**saved["blackbox"]), out_dir, saved["best_of"])
