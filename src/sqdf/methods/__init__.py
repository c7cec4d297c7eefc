"""Fine-tuning methods, each one module with one config dataclass. Register new ones in METHODS."""

from .base import Generated, InferenceMethod, IterationContext, Method, MethodConfig, Rollout
from .sqdf import SQDF, SQDFConfig

METHODS: dict[str, type[Method]] = {SQDF.name: SQDF}

__all__ = ["Generated", "InferenceMethod", "IterationContext", "METHODS", "Method", "MethodConfig", "Rollout", "SQDF", "SQDFConfig"]
