"""A fixed-size ring buffer of sampled trajectories, with the sampling rules SQDF uses.

Entries hold all states of a chain [T+1, *shape], its condition (or none) and its reward. A draw returns
(entry index, step k) pairs, k in 0 .. T-1, under one of three rules:

- ``random``: entry and step uniform.
- ``on_policy``: entries uniform among the newest ``batch`` inserted; step uniform.
- ``reward_gamma_per``: pairs drawn with replacement with probability ∝ max(r, 0) * gamma^(T-1-k)
  (falls back to uniform when every reward is <= 0).
"""

from __future__ import annotations

import torch

SAMPLING_MODES = ("random", "on_policy", "reward_gamma_per")


def pair_probabilities(rewards: torch.Tensor, num_steps: int, gamma: float) -> torch.Tensor:
    """Prioritized pair probabilities [N, T] ∝ max(r_i, 0) * gamma^(T-1-k); uniform when all r <= 0."""
    pos = rewards.to(torch.float64).clamp(min=0)
    discount = gamma ** torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)
    weights = pos[:, None] * discount[None, :]
    total = weights.sum()
    if total <= 0:
        return torch.full_like(weights, 1.0 / weights.numel())
    return weights / total


class ReplayBuffer:
    """Ring buffer of ``capacity`` trajectories. Tensors live on ``device``; all draws use a caller's generator."""

    def __init__(self, capacity: int, num_steps: int, device: torch.device | str = "cpu"):
        self.capacity = int(capacity)
        self.num_steps = int(num_steps)
        self.device = torch.device(device)
        self.states: torch.Tensor | None = None  # [capacity, T+1, *shape]
        self.conds: torch.Tensor | None = None  # [capacity, ...]
        self.rewards = torch.zeros(self.capacity, device=self.device)
        self.inserted = 0  # total entries ever added
        self.order = torch.zeros(self.capacity, dtype=torch.long, device=self.device)  # insertion number per slot

    def __len__(self) -> int:
        return min(self.inserted, self.capacity)

    def clear(self) -> None:
        self.states, self.conds = None, None
        self.inserted = 0

    def add(self, states: torch.Tensor, rewards: torch.Tensor, conds: torch.Tensor | None = None) -> None:
        """Insert B trajectories: states [B, T+1, *shape], rewards [B], conds [B, ...] or None."""
        if states.shape[0] > self.capacity:  # only the newest `capacity` rows can stay
            drop = states.shape[0] - self.capacity
            self.inserted += drop
            states, rewards = states[drop:], rewards[drop:]
            conds = None if conds is None else conds[drop:]
        b = states.shape[0]
        if states.shape[1] != self.num_steps + 1:
            raise ValueError(f"states have {states.shape[1]} states per chain, the buffer expects {self.num_steps + 1}")
        if self.states is None:
            self.states = torch.zeros((self.capacity, *states.shape[1:]), dtype=states.dtype, device=self.device)
            if conds is not None:
                self.conds = torch.zeros((self.capacity, *conds.shape[1:]), dtype=conds.dtype, device=self.device)
        slots = (torch.arange(b, device=self.device) + self.inserted) % self.capacity
        self.states[slots] = states.detach().to(self.device)
        self.rewards[slots] = rewards.detach().to(self.device, self.rewards.dtype)
        if self.conds is not None and conds is not None:
            self.conds[slots] = conds.detach().to(self.device)
        self.order[slots] = torch.arange(self.inserted, self.inserted + b, device=self.device)
        self.inserted += b

    def sample_pairs(
        self, batch: int, mode: str, generator: torch.Generator, gamma: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``batch`` (entry, step) pairs; returns (entries [batch], steps [batch]) as long tensors."""
        n = len(self)
        if n == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        gdev = generator.device
        if mode == "random":
            idx = torch.randint(0, n, (batch,), generator=generator, device=gdev)
            k = torch.randint(0, self.num_steps, (batch,), generator=generator, device=gdev)
        elif mode == "on_policy":
            newest = torch.argsort(self.order[:n], descending=True)[: min(batch, n)].to(gdev)
            pick = torch.randint(0, newest.numel(), (batch,), generator=generator, device=gdev)
            idx = newest[pick]
            k = torch.randint(0, self.num_steps, (batch,), generator=generator, device=gdev)
        elif mode == "reward_gamma_per":
            probs = pair_probabilities(self.rewards[:n], self.num_steps, gamma).flatten().to(gdev)
            flat = torch.multinomial(probs, batch, replacement=True, generator=generator)
            idx, k = flat // self.num_steps, flat % self.num_steps
        else:
            raise ValueError(f"sampling mode {mode!r} is not one of {SAMPLING_MODES}")
        return idx.to(self.device), k.to(self.device)

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "num_steps": self.num_steps,
            "states": None if self.states is None else self.states.cpu(),
            "conds": None if self.conds is None else self.conds.cpu(),
            "rewards": self.rewards.cpu(),
            "order": self.order.cpu(),
            "inserted": self.inserted,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or state["num_steps"] != self.num_steps:
            raise ValueError(
                f"buffer in checkpoint has capacity {state['capacity']} and {state['num_steps']} steps; "
                f"this run has {self.capacity} and {self.num_steps}"
            )
        self.states = None if state["states"] is None else state["states"].to(self.device)
        self.conds = None if state["conds"] is None else state["conds"].to(self.device)
        self.rewards = state["rewards"].to(self.device)
        self.order = state["order"].to(self.device)
        self.inserted = int(state["inserted"])
