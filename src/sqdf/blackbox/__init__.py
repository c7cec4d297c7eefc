"""Online black-box optimization: an oracle with a hard query budget whose every paid-for label is kept on disk,
differentiable proxies fit on the labels, and the round loop with any method as the inner optimizer. Feature maps live in ``sqdf.models.features``."""

from .oracle import BudgetExceeded, Oracle, http_reward, sample_ids
from .proxy import EnsembleProxy, UCBProxy, make_proxy

__all__ = ["BudgetExceeded", "EnsembleProxy", "Oracle", "UCBProxy", "http_reward", "make_proxy", "sample_ids"]
