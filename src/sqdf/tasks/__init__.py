"""Tasks: a base model, a reward, conditions and what is known of the optimum."""

from .base import KnownOptimum, Task, TaskConfig
from .builtin import PRESETS, TASKS, presets
from .mixture_task import ExactTarget, MixtureTask

__all__ = ["PRESETS", "presets", "ExactTarget", "KnownOptimum", "MixtureTask", "TASKS", "Task", "TaskConfig"]
