"""Tasks: a base model, a reward, conditions and what is known of the optimum."""

from .base import KnownOptimum, Task, TaskConfig
from .builtin import BENCH_PRESETS, PRESETS, TASKS, bench_presets, presets
from .mixture_task import ExactTarget, MixtureTask

__all__ = ["BENCH_PRESETS", "PRESETS", "bench_presets", "presets", "ExactTarget", "KnownOptimum", "MixtureTask", "TASKS", "Task", "TaskConfig"]
