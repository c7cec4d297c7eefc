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

import json
import os

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..evaluation.metrics import objective_terms
from ..training.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from .oracle import Oracle
from .run_folder import BlackboxConfig, plot_rounds, saved_run, task_features, write_saved


class BlackboxRun:
    """One black-box optimization run: an oracle, a proxy refit each round, and an inner Trainer."""

    def __init__(self, task_name: str, method_name: str, run_config: RunConfig, bb: BlackboxConfig, out_dir: str):
        from ..training.trainer import Trainer

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
        run = cls(*saved_run(out_dir), out_dir)
        if not list_checkpoints(out_dir):  # killed before the first round ended: start over (labels are kept)
            return run
        _, state, _ = load_latest_checkpoint(out_dir)
        run.load_state(state)
        run._truncate(run.round)
        return run

    # ---- files --------------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        write_saved(self.out_dir, self.task_name, self.method_name, self.bb)

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
