"""Online black-box optimization: an oracle with a hard query budget whose every paid-for label is kept on disk."""

from .oracle import BudgetExceeded, Oracle, http_reward, sample_ids

__all__ = ["BudgetExceeded", "Oracle", "http_reward", "sample_ids"]
