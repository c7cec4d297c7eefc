"""Denoiser networks and their training."""

from .denoisers import MixtureScoreDenoiser, MLPDenoiser, ResidualDenoiser

__all__ = ["MLPDenoiser", "MixtureScoreDenoiser", "ResidualDenoiser"]
