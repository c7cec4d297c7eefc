"""The one training loop shared by all methods: sample -> score -> update, with evaluation and checkpoints.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged
iteration or evaluation), ``checkpoints/`` (atomic, the newest ``keep_checkpoints`` kept), ``plots/``,
``tb/`` (TensorBoard) and, at the end, ``summary.json``, ``samples.safetensors`` and the fine-tuned weights
``model.safetensors`` (written by the task's ``export_model``). ``Trainer.resume(DIR)`` continues from the newest
checkpoint and produces the same numbers as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import time

import torch

from ..config import RunConfig
from ..errors import ConfigError
from ..evaluation.metrics import objective_terms
from ..methods import IterationContext, Method, Rollout
from ..methods.base import lr_factor
from . import run_files
from .checked_reward import CheckedReward
from .checkpoint import atomic_write_text, load_latest_checkpoint, save_checkpoint
from .learned_reward import load_learned_reward
from .run_setup import (
    TrainerConfig,
    build_policy,
    load_trainable_state,
    make_task,
    method_class,
    read_run_config,
    trainable_state,
    write_run_config,
)


class Trainer:
    """Runs one method on one task. Build with ``Trainer(task_name, method_name, config, out_dir)``."""

    def __init__(self, task_name: str, method_name: str, config: RunConfig, out_dir: str,
                 training_reward=None):
        """``training_reward``: a stand-in for the task's reward during training (a proxy fit on oracle queries,
        ``sqdf blackbox``; or, from ``trainer.reward_model``, a reward model learned from preferences); evaluations
        always score with the task's own reward."""
        self.task_name, self.method_name = task_name, method_name
        self.config = config
        self.out_dir = out_dir
        tcfg: TrainerConfig = config.trainer
        tcfg.validate()
        cls = method_class(method_name)
        config.method.validate()
        self.task = make_task(task_name, config.task)
        self.learned_reward = None
        if tcfg.reward_model is not None:
            if training_reward is not None:
                raise ConfigError("trainer.reward_model replaces the training reward, but this run already has one "
                                  "(the proxy or oracle of `sqdf blackbox`); drop trainer.reward_model")
            if tcfg.reward_model_trust and not cls.uses_sample_weights:
                from ..methods import METHODS

                weighted = [name for name, m in METHODS.items() if m.uses_sample_weights]
                raise ConfigError(f"trainer.reward_model_trust=true weights each sample's loss term (PrefPaint), "
                                  f"but method {method_name} ignores sample weights; use a method that applies "
                                  f"them ({', '.join(weighted)}) or set trainer.reward_model_trust=false")
            self.learned_reward = load_learned_reward(tcfg.reward_model, self.task, "cpu",
                                                      tcfg.reward_model_pessimism)
            training_reward = self.learned_reward
        needs_gradient = cls.reward_gradient_needed(config.method)
        if needs_gradient and training_reward is None and not self.task.differentiable_reward:
            raise ConfigError(f"method {method_name} follows the reward's gradient, but the {task_name} reward "
                              f"({getattr(config.task, 'reward', '?')}) is black-box; use a gradient-free method "
                              "(ddpo, dpok, prdp, best_of_n, fk_steering) or a differentiable reward")

        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=tcfg.device == "cpu", mixed_precision=tcfg.mixed_precision)
        if tcfg.device == "cuda" and self.accelerator.device.type != "cuda":
            raise ConfigError("trainer.device='cuda' but no CUDA device is visible; use trainer.device=auto or cpu")
        self.device = self.accelerator.device
        _seed_everything(tcfg.seed)
        if self.learned_reward is not None:
            self.learned_reward.model.to(self.device)

        self.policy = build_policy(self.task, config, out_dir, self.device, cls)
        self.reward = CheckedReward(training_reward or self.task.reward, name=f"{task_name} reward")
        self.inference_reward = CheckedReward(self.task.reward, name=f"{task_name} reward")
        self.method: Method = cls(config.method, self.policy, self.task.alpha)
        self.method.to(self.device)
        self.optimizer = None
        if self.method.trains:
            if not self.method.parameters():
                raise ConfigError(f"method {method_name} found no trainable parameters in the policy")
            self.optimizer = torch.optim.AdamW(self.method.param_groups(), lr=config.method.lr,
                                               weight_decay=config.method.weight_decay)
            self.policy.model, self.optimizer = self.accelerator.prepare(self.policy.model, self.optimizer)
        # each process draws its own chains (a single process keeps seed + 1); DDP averages their gradients
        rank = self.accelerator.process_index
        self.generator = torch.Generator(device=self.device).manual_seed(tcfg.seed + 1 + 1_000_003 * rank)
        self.iteration = 0
        self.elapsed_before = 0.0
        self._tb = None
        self.labels = None
        if tcfg.labeller is not None:
            if not cls.reads_labels:
                from ..methods import METHODS

                readers = [name for name, m in METHODS.items() if m.reads_labels]
                raise ConfigError(f"trainer.labeller labels online pairs, but method {method_name} does not ask for "
                                  f"labels; use {', '.join(readers)} or drop trainer.labeller")
            from ..preferences.labellers import LabelLog, make_labeller

            self.labels = LabelLog(make_labeller(tcfg.labeller, out_dir), tcfg.label_budget,
                                   os.path.join(out_dir, "labels"))

    # ---- construction from disk ------------------------------------------------------------------------------
    @classmethod
    def resume(cls, run_dir: str) -> "Trainer":
        """Rebuild a run from DIR/config.yaml and load its newest checkpoint."""
        task_name, method_name, run_config = read_run_config(run_dir)
        iteration, state, _ = load_latest_checkpoint(run_dir)
        trainer = cls(task_name, method_name, run_config, run_dir)
        trainer.load_state(state)
        return trainer

    # ---- state ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "iteration": self.iteration,
            "model": trainable_state(self.accelerator.unwrap_model(self.policy.model)),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": list(random.getstate()[1]),
            "reward_queries": self.reward.queries,
            "wall_seconds": self._wall_seconds(),
            # gradient accumulation: the backward passes summed so far toward the next optimizer step
            "micro_steps": getattr(self, "_micro_steps", 0),
            "pending_grads": [None if p.grad is None else p.grad.detach().cpu().clone()
                              for p in self._optimized_parameters()],
        }

    def load_state(self, state: dict) -> None:
        load_trainable_state(self.accelerator.unwrap_model(self.policy.model), state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.generator.set_state(state["generator"].cpu())
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        self.iteration = int(state["iteration"])
        self.reward.queries = int(state["reward_queries"])
        self.elapsed_before = float(state["wall_seconds"])
        self._micro_steps = int(state.get("micro_steps", 0))
        for p, g in zip(self._optimized_parameters(), state.get("pending_grads", [])):
            p.grad = None if g is None else g.to(p.device)

    def _optimized_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.method.param_groups() for p in group["params"]] if self.method.trains else []

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        tcfg: TrainerConfig = self.config.trainer
        os.makedirs(self.out_dir, exist_ok=True)
        self._start = time.time()
        resumed = self.iteration > 0
        if resumed:
            run_files.truncate_metrics(self.out_dir, self.iteration)
        else:
            self.write_config()
            if os.path.exists(run_files.metrics_path(self.out_dir)):
                os.remove(run_files.metrics_path(self.out_dir))
        if tcfg.tensorboard and self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.out_dir, "tb"), purge_step=self.iteration + 1)
        if self.accelerator.is_main_process and tcfg.progress:
            m = self.config.method
            print(f"sqdf: {self.method_name} on {self.task_name}: {tcfg.steps} iterations x {m.batch_size} chains x "
                  f"{self.policy.num_steps} steps on {self.device} ({self.accelerator.num_processes} process(es)); "
                  f"alpha={self.task.alpha}; run directory {self.out_dir}"
                  + (f"; resuming at iteration {self.iteration}" if resumed else ""), flush=True)
        if self.accelerator.is_main_process and self.method.trains:
            self._print_batch_arithmetic()
        if not resumed:
            self._evaluate(plot_name="samples_000000_base.png")
        bar = None
        if tcfg.progress and self.accelerator.is_main_process and self.method.trains:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=self.iteration, desc=f"{self.method_name} on {self.task_name}")
        while self.method.trains and self.iteration < tcfg.steps and not self._budget_spent():
            ctx = IterationContext(self.iteration, self.generator, self._rollout, self.reward, self._optimizer_step,
                                   self._conditions, self._backward_only,
                                   None if self.labels is None else self.labels.within_budget)
            self._last_rollout_reward = float("nan")
            self._last_trust_weight = float("nan")
            queries_before = self.reward.queries
            if self.labels is None:
                stats = self.method.train_iteration(ctx)
            else:
                stats = self._labelled_iteration(ctx)
            self.iteration += 1
            if self.iteration % tcfg.log_every == 0:
                row = {"iteration": self.iteration, "kind": "train", "reward_queries": self.reward.queries, **stats}
                if self.labels is not None:
                    row["labels_spent"] = self.labels.spent
                if not math.isnan(self._last_rollout_reward):  # offline methods (diffusion-dpo) draw no rollout
                    row["rollout_reward"] = self._last_rollout_reward
                if not math.isnan(getattr(self, "_last_trust_weight", float("nan"))):
                    row["trust_weight"] = self._last_trust_weight
                self._log(row)
            if bar is not None:
                bar.update(1)
                if not math.isnan(self._last_rollout_reward):
                    bar.set_postfix(reward=f"{self._last_rollout_reward:.3f}")
            final = self.iteration == tcfg.steps or self._budget_spent()
            every_q = tcfg.eval_every_queries
            crossed = every_q and self.reward.queries // every_q > queries_before // every_q
            if final or crossed or (tcfg.eval_every and self.iteration % tcfg.eval_every == 0):
                self._evaluate(plot_name=f"samples_{self.iteration:06d}.png")
            if final or self.iteration % tcfg.checkpoint_every == 0:
                if self.accelerator.is_main_process:
                    save_checkpoint(self.out_dir, self.iteration, self.state(), tcfg.keep_checkpoints)
        if bar is not None:
            bar.close()
        summary = self._summary()
        if self._tb is not None:
            self._tb.close()
        return summary

    def _labelled_iteration(self, ctx: IterationContext) -> dict:
        """One iteration whose labels come from trainer.labeller. When the labeller is waiting for answers
        (LabelsPending), the state from before the iteration is checkpointed, so `sqdf resume` replays it exactly
        (same pairs, answered from the file then) once the answers are in."""
        from ..preferences.labellers import LabelsPending

        before = self.state()
        try:
            return self.method.train_iteration(ctx)
        except LabelsPending:
            if self.accelerator.is_main_process:
                save_checkpoint(self.out_dir, self.iteration, before, self.config.trainer.keep_checkpoints)
            raise

    def _budget_spent(self) -> bool:
        budget = self.config.trainer.max_queries
        return (budget > 0 and self.reward.queries >= budget) or (self.labels is not None and self.labels.exhausted)

    def _conditions(self, n: int):
        return self.task.sample_conditions(n, self.generator)

    def _rollout(self, n: int, cond=None, initial=None, score: bool = True) -> Rollout:
        if cond is None:
            cond = self._conditions(n)
        self.policy.eval()
        traj = self.policy.sample(n, cond, self.generator, initial=initial)
        if not score:
            return Rollout(traj, torch.full((n,), float("nan"), device=traj.samples.device))
        with torch.no_grad():
            rewards = self.reward(traj.samples, cond)
        self._last_rollout_reward = float(rewards.mean())
        weights = None
        if self.config.trainer.reward_model_trust:  # PrefPaint: the learned reward's trust in each sample
            weights = self.learned_reward.trust_weight(traj.samples, cond)
            self._last_trust_weight = float(weights.mean())
        return Rollout(traj, rewards, weights)

    def _print_batch_arithmetic(self) -> None:
        m, acc = self.config.method, self.accelerator
        steps = self.config.trainer.gradient_accumulation_steps
        print(f"sqdf: batch arithmetic: {m.batch_size} chains per process x {acc.num_processes} process(es) = "
              f"{m.batch_size * acc.num_processes} chains per iteration; gradient accumulation {steps}: each "
              f"optimizer step sums {steps} backward pass(es) of every process (mixed precision: "
              f"{acc.mixed_precision})", flush=True)

    def _backward_only(self, loss: torch.Tensor) -> None:
        """Accumulate loss's gradient locally (no DDP all-reduce, no step): a chunk of the next optimizer step."""
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss became {float(loss)} at iteration {self.iteration}; lower method.lr")
        with self.accelerator.no_sync(self.policy.model):
            self.accelerator.backward(loss / self.config.trainer.gradient_accumulation_steps)

    def _optimizer_step(self, loss: torch.Tensor) -> dict:
        """Backward, then (every gradient_accumulation_steps calls) clip each parameter group and step."""
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss became {float(loss)} at iteration {self.iteration}; lower method.lr")
        steps = self.config.trainer.gradient_accumulation_steps
        self._micro_steps = getattr(self, "_micro_steps", 0) + 1
        if self._micro_steps % steps:  # not the last of the group: keep the gradient local (no DDP all-reduce)
            with self.accelerator.no_sync(self.policy.model):
                self.accelerator.backward(loss / steps)
            return {"grad_norm": float("nan")}
        self.accelerator.backward(loss / steps)
        max_norm = self.config.method.max_grad_norm
        norms = []  # each parameter group (policy, value head, ...) is clipped on its own
        for group in self.method.param_groups():
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if max_norm > 0:
                norms.append(self.accelerator.clip_grad_norm_(params, max_norm))
            else:
                norms.append(torch.norm(torch.stack([p.grad.norm() for p in params])))
        norm = norms[0] if norms else torch.tensor(0.0)
        self._apply_lr_schedule()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm)}

    def _apply_lr_schedule(self) -> None:
        """Set every group's lr from its starting value and the run's progress (method.lr_schedule)."""
        mcfg, tcfg = self.config.method, self.config.trainer
        if getattr(mcfg, "lr_schedule", "constant") == "constant":
            return
        if not hasattr(self, "_base_lrs"):
            self._base_lrs = [group.get("lr", mcfg.lr) for group in self.method.param_groups()]
        progress = self.iteration / max(tcfg.steps - 1, 1)  # the 0-based index of the running iteration
        if tcfg.max_queries > 0:
            progress = max(progress, self.reward.queries / tcfg.max_queries)
        factor = lr_factor(mcfg.lr_schedule, progress, mcfg.lr_final_fraction)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    # ---- evaluation and logging ----------------------------------------------------------------------------
    def evaluate(self, n: int | None = None) -> tuple[dict, torch.Tensor]:
        """Metrics of the method's samples on n fresh draws (fixed evaluation noise). Scoring them counts no
        training queries; what an inference-time method spends while sampling is reported per sample."""
        tcfg: TrainerConfig = self.config.trainer
        n = n or tcfg.eval_samples
        g = torch.Generator(device=self.device).manual_seed(tcfg.seed * 1_000_003 + 7919)
        cond = self.task.sample_conditions(n, g)
        self.policy.eval()
        spent_before = self.inference_reward.queries
        gen = self.method.generate(n, cond, g, self.inference_reward)
        queries_per_sample = (self.inference_reward.queries - spent_before) / n
        with torch.no_grad():
            rewards = self.inference_reward(gen.samples, cond, count=False)  # the task's true reward, uncharged
        path_kl = gen.path_kl if gen.path_kl is not None else torch.full_like(rewards, float("nan"))
        out = objective_terms(rewards, path_kl, self.task.alpha)
        if gen.path_kl is None:  # no exact path KL for this sampler: J and regret are not defined per path
            out.update({key: None for key in ("path_kl", "path_kl_stderr", "objective", "objective_stderr")})
        out["kl_note"] = gen.kl_note
        out["queries_per_sample"] = queries_per_sample
        opt = self.task.known_optimum()
        if opt is not None:
            out["optimum"] = opt.optimum
            out["regret"] = None if out["objective"] is None else opt.optimum - out["objective"]
        out.update(self.task.evaluate(gen.samples, cond))
        if self.learned_reward is not None:  # beside the true reward_mean: over-optimization shows as a gap
            out.update(self.learned_reward.summary(gen.samples, cond))
        self._last_cond = cond
        return out, gen.samples

    def _evaluate(self, plot_name: str) -> dict:
        metrics, samples = self.evaluate()
        row = {"iteration": self.iteration, "kind": "eval", "reward_queries": self.reward.queries,
               "wall_seconds": round(self._wall_seconds(), 3), **metrics}
        self._log(row)
        if self.config.trainer.plots and self.accelerator.is_main_process:
            title = f"{self.method_name} on {self.task_name}, iteration {self.iteration}"
            self.task.plot(samples, os.path.join(self.out_dir, "plots", plot_name), title, cond=self._last_cond)
        self._last_eval = metrics
        self._last_samples = samples
        return metrics

    def _summary(self) -> dict:
        metrics = getattr(self, "_last_eval", None) or self.evaluate()[0]
        opt = self.task.known_optimum()
        summary = {
            "task": self.task_name,
            "method": self.method_name,
            "seed": self.config.trainer.seed,
            "iterations": self.iteration,
            "alpha": self.task.alpha,
            "num_inference_steps": self.policy.num_steps,
            **{k: v for k, v in metrics.items() if k not in ("optimum", "regret")},
            "optimum": None if opt is None else opt.optimum,
            "optimum_stderr": None if opt is None else opt.optimum_stderr,
            "regret": metrics.get("regret"),
            "target_mode_weights": None if opt is None or opt.mode_weights is None
            else [round(w, 4) for w in opt.mode_weights],
            "reward_queries": self.reward.queries,
            "wall_seconds": round(self._wall_seconds(), 3),
        }
        if self.labels is not None:
            summary["labels_spent"] = self.labels.spent
        if self.config.trainer.floor and hasattr(self.task, "sampling_floor") and opt is not None:
            try:
                floor = self.task.sampling_floor(self.policy.num_steps, n=self.config.trainer.eval_samples)
                summary["floor"] = {k: floor[k] for k in ("reward_mean", "path_kl", "objective", "regret")}
            except ConfigError:
                pass
        if self.accelerator.is_main_process:
            atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2))
            if self.method.trains:
                model = self.accelerator.unwrap_model(self.policy.model)
                self.task.export_model(model, os.path.join(self.out_dir, "model.safetensors"))
            if getattr(self, "_last_samples", None) is not None:
                run_files.save_samples(self.out_dir, self._last_samples)
            self._plot_curves()
        return summary

    def _plot_curves(self) -> None:
        from ..evaluation.plots import plot_curves

        plot_curves(run_files.eval_rows(self.out_dir), os.path.join(self.out_dir, "plots", "curves.png"),
                    f"{self.method_name} on {self.task_name}")

    def _log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        run_files.append_row(self.out_dir, row)
        if self._tb is not None:
            prefix = row["kind"]
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "iteration" and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, row["iteration"])

    def write_config(self) -> None:
        """DIR/config.yaml with the current config (``run_setup.write_run_config``)."""
        write_run_config(self.out_dir, self.task_name, self.method_name, self.config)

    def _wall_seconds(self) -> float:
        return self.elapsed_before + (time.time() - getattr(self, "_start", time.time()))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
