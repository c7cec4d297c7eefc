"""How a run is assembled from names: the trainer's config, the task and method registries (with did-you-mean
errors), the default RunConfig of a method on a task, a run directory's saved config, and the policy a run trains.
Shared by the Trainer, `sqdf sample`, `sqdf bench` and `sqdf blackbox`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import yaml

from ..config import RunConfig, option
from ..diffusion.policy import DiffusionPolicy
from ..errors import CheckpointError, ConfigError
from ..methods import METHODS, Method
from ..tasks import TASKS, Task, TaskConfig


@dataclass
class TrainerConfig:
    """How a run is driven: length, seed, evaluation, checkpoints, devices and logging."""

    steps: int = option(150, "training iterations")
    max_queries: int = option(0, "stop once this many training reward queries are spent (0: no limit); "
                              "`sqdf bench` uses it to give every method the same budget")
    seed: int = option(0, "seed of every random number in the run")
    eval_every: int = option(50, "evaluate every N iterations (and at the end); 0: only at the end")
    eval_every_queries: int = option(0, "also evaluate each time the query count passes a multiple of N (0: off)")
    eval_samples: int = option(4096, "samples drawn for each evaluation")
    checkpoint_every: int = option(25, "write a checkpoint every N iterations (and at the end)")
    keep_checkpoints: int = option(2, "newest checkpoints kept on disk")
    log_every: int = option(1, "write training metrics every N iterations")
    device: str = option("auto", "'auto' (GPU when present), 'cpu' or 'cuda'")
    mixed_precision: str = option("no", "'no', 'fp16' or 'bf16' (through accelerate)")
    gradient_accumulation_steps: int = option(1, "backward passes summed per optimizer step (through accelerate)")
    tensorboard: bool = option(True, "also write TensorBoard scalars to DIR/tb")
    progress: bool = option(True, "show a progress bar")
    plots: bool = option(True, "save sample plots at each evaluation")
    floor: bool = option(True, "report the exact-score sampling floor in summary.json (toy tasks)")
    reward_model: str | None = option(None, "path of a reward model learned from preferences (`sqdf reward-model`): "
                                      "every training reward query is then its reward on the task's proxy features "
                                      "(counted as queries), while evaluations score the task's true reward, so "
                                      "over-optimization of the learned reward shows (eval rows log learned_reward "
                                      "beside reward_mean); differentiable, so gradient methods may use it on "
                                      "black-box tasks")
    reward_model_pessimism: float = option(0.0, "train on the learned reward's mean - kappa * std across its "
                                           "ensemble (kappa >= 0; 0: the mean), a remedy for over-optimization")
    labeller: str | None = option(None, "who labels the online pairs of d3po: None (Bradley-Terry on the task "
                                  "reward at method.label_temperature, 2 queries a label), 'http://localhost:PORT/"
                                  "PATH' (a person or program answering POSTed pairs) or 'answers:FILE' (a jsonl "
                                  "file of answers; unanswered pairs are written to DIR/questions and the run stops "
                                  "until they are answered, then `sqdf resume`); every label is logged in DIR/labels")
    label_budget: int = option(0, "with trainer.labeller: the most labels the run may buy (0: no limit); the run "
                               "ends when they are spent")
    reward_model_trust: bool = option(False, "PrefPaint's trust weighting: each rollout sample's loss term is "
                                      "weighted by clamp(exp(-0.05 sqrt(phi^T V^-1 phi) + 0.7), 1, 2.21) on the "
                                      "learned reward's last-layer features (methods that use sample weights: ddpo, "
                                      "rlcm)")

    def validate(self) -> None:
        for name in ("steps", "eval_samples", "checkpoint_every", "keep_checkpoints", "log_every",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every", "eval_every_queries", "max_queries"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"trainer.device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"trainer.mixed_precision={self.mixed_precision!r} must be 'no', 'fp16' or 'bf16'")
        if self.label_budget < 0:
            raise ConfigError(f"trainer.label_budget={self.label_budget} must be >= 0 (0: no limit)")
        if self.labeller is not None and not (self.labeller.startswith(("http://", "https://", "answers:"))):
            raise ConfigError(f"trainer.labeller={self.labeller!r} must be 'http://localhost:PORT/PATH' or "
                              "'answers:FILE', or null to label by the task reward")
        if self.label_budget and self.labeller is None:
            raise ConfigError("trainer.label_budget applies to trainer.labeller; set a labeller too (or use "
                              "trainer.max_queries to bound the reward-labelled pairs)")
        if self.reward_model is not None and not self.reward_model.strip():
            raise ConfigError("trainer.reward_model is empty; give the path of a `sqdf reward-model` file, or null")
        if not self.reward_model_pessimism >= 0:
            raise ConfigError(f"trainer.reward_model_pessimism={self.reward_model_pessimism} must be >= 0 "
                              "(0: train on the learned reward's ensemble mean)")
        if self.reward_model is None and (self.reward_model_pessimism > 0 or self.reward_model_trust):
            key = "reward_model_trust" if self.reward_model_trust else "reward_model_pessimism"
            raise ConfigError(f"trainer.{key} applies to a learned reward; set trainer.reward_model=MODEL.safetensors "
                              "(from `sqdf reward-model`) too, or drop it")


def _did_you_mean(name: str, known: list[str]) -> str:
    """'; did you mean 'a' or 'b'?' for the close matches of name among known (in known's order), else ''."""
    import difflib

    near = sorted(difflib.get_close_matches(name, known, n=3), key=known.index)
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def check_task_name(name: str) -> None:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}{_did_you_mean(name, list(TASKS))} Known tasks: "
                          f"{', '.join(TASKS)} (see `sqdf tasks`)")


def make_task(name: str, config: TaskConfig | None = None) -> Task:
    """Build a task; config None: the task's defaults (``tasks.default_task_config``)."""
    from ..tasks import default_task_config

    check_task_name(name)
    config = default_task_config(name) if config is None else config
    config.validate()
    return TASKS[name](config)


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}{_did_you_mean(name, list(METHODS))} Known methods: "
                          f"{', '.join(METHODS)}")
    return METHODS[name]


def default_config(method: str, task: str | None = None) -> RunConfig:
    """Defaults of the method's config, with the task's presets for that method applied (see tasks.PRESETS)."""
    from ..tasks import default_task_config, presets

    task_config = TaskConfig() if task is None else default_task_config(task)
    config = RunConfig(TrainerConfig(), method_class(method).config_class(), task_config)
    if task is not None:
        config.update(presets(task, method))
    return config


def write_run_config(run_dir: str, task_name: str, method_name: str, config: RunConfig) -> None:
    """DIR/config.yaml: the task and method names and the resolved config, atomically (``read_run_config`` reads it)."""
    from .checkpoint import atomic_write_text

    data = {"task_name": task_name, "method_name": method_name, "config": config.to_dict()}
    atomic_write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(data, sort_keys=False))


def read_run_config(run_dir: str) -> tuple[str, str, RunConfig]:
    """(task name, method name, resolved RunConfig) from a run directory's config.yaml, with clear errors."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} does not exist; pass the --out DIR of a `sqdf train` run")
    if not os.path.exists(path):
        raise CheckpointError(f"{run_dir!r} has no config.yaml, so it is not a run directory of `sqdf train`")
    with open(path) as fh:
        saved = yaml.safe_load(fh)
    run_config = default_config(saved["method_name"], saved["task_name"])
    run_config.update(saved["config"])
    return saved["task_name"], saved["method_name"], run_config


def build_policy(task: Task, config: RunConfig, out_dir: str | None, device,
                 method: type[Method] | None = None) -> DiffusionPolicy:
    """The policy on ``device``: the method's own when it builds one (``Method.build_policy``; ``method`` None: the
    method whose config class config.method has), else the task's: trainable denoiser, frozen reference (a copy, or
    the same network with its adapters off) and, for the consistency estimator, the task's consistency model."""
    method = method or next((m for m in METHODS.values() if type(config.method) is m.config_class), None)
    own = method.build_policy(task, config, out_dir, device) if method is not None else None
    if own is not None:
        return own
    schedule = task.make_schedule()
    reference = task.build_reference(schedule, out_dir)
    model = task.build_policy_model(reference)
    if getattr(task, "reference_in_policy", False):
        reference = None  # the reference is the policy network with its adapters off
    task.to(device)
    policy = DiffusionPolicy(model, schedule, task.sample_shape, reference=reference).to(device)
    if getattr(config.method, "estimator", None) == "consistency":
        policy.attach_consistency_model(task.consistency_model())
    if getattr(config.method, "value", None) == "exact":
        if not hasattr(task, "soft_value"):
            raise ConfigError(f"method.value=exact needs the task's exact soft value; task {type(task).__name__} has "
                              "none (the toy mixture tasks do): use method.value=critic")
        policy.attach_soft_value(task.soft_value)
    return policy


def load_trainable_state(model: torch.nn.Module, state: dict) -> None:
    """Inverse of ``trainable_state``."""
    if hasattr(model, "load_trainable_state_dict"):
        model.load_trainable_state_dict(state)
    else:
        model.load_state_dict(state)


def trainable_state(model: torch.nn.Module) -> dict:
    """What a checkpoint keeps of the policy network: its adapters only when it says so (LoRA on a large frozen
    base), else the whole state dict."""
    if hasattr(model, "trainable_state_dict"):
        return model.trainable_state_dict()
    return model.state_dict()
