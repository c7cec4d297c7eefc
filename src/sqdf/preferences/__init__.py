"""Preference data: pairs (condition, sample a, sample b, which won) from files or from a labelled reward."""

from .data import PreferencePairs, load_pairs, write_pairs
from .labels import bradley_terry_labels, preference_loss

__all__ = ["PreferencePairs", "bradley_terry_labels", "load_pairs", "preference_loss", "write_pairs"]
