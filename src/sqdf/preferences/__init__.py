"""Preference data: pairs (condition, sample a, sample b, which won) from files or from a labelled reward, and
Bradley-Terry reward models learned from them (``PreferenceRewardModel``)."""

from .data import PreferencePairs, load_pairs, write_pairs
from .labels import bradley_terry_labels, preference_loss
from .reward_model import PreferenceRewardModel, bradley_terry_loss

__all__ = ["PreferencePairs", "PreferenceRewardModel", "bradley_terry_labels", "bradley_terry_loss", "load_pairs",
           "preference_loss", "write_pairs"]
