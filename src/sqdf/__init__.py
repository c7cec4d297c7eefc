"""sqdf: fine-tune diffusion models toward a reward (SQDF and the methods it is measured against)."""

__version__ = "0.1.0"
