"""Tasks: a base model, a reward, conditions and what is known of the optimum."""

from .base import KnownOptimum, Task, TaskConfig
from .builtin import (
                      BENCH_PRESETS,
                      PRESETS,
                      SD_TASKS,
                      TASK_DEFAULTS,
                      TASKS,
                      bench_presets,
                      default_task_config,
                      presets,
                      task_config_class,
                      tiny_overrides,
)
from .digits_task import DigitsTask
from .mixture_task import ExactTarget, MixtureTask

__all__ = ["BENCH_PRESETS", "PRESETS", "SD_TASKS", "tiny_overrides", "task_config_class", "TASK_DEFAULTS", "default_task_config", "DigitsTask", "bench_presets", "presets", "ExactTarget", "KnownOptimum", "MixtureTask", "TASKS", "Task", "TaskConfig"]
