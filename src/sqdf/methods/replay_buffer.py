"""A fixed-size ring buffer of sampled trajectories, with the sampling rules SQDF uses.

Entries hold all states of a chain [T+1, *shape], its condition (or none), its reward and, when given, the exact
per-step KLs of the policy that sampled it [T] (a learned soft value regresses on r - alpha sum KL). A draw returns
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
        self.kls: torch.Tensor | None = None  # [capacity, T], sampling-time step KLs (when added with kls)
        self.x0s: torch.Tensor | None = None  # [capacity, T+1, *shape], x0 estimates of the states (when added)
        self.inserted = 0  # total entries ever added
        self.order = torch.zeros(self.capacity, dtype=torch.long, device=self.device)  # insertion number per slot

    def __len__(self) -> int:
        return min(self.inserted, self.capacity)

    def clear(self) -> None:
        self.states, self.conds, self.kls, self.x0s = None, None, None, None
        self.inserted = 0

    def add(self, states: torch.Tensor, rewards: torch.Tensor, conds: torch.Tensor | None = None,
            kls: torch.Tensor | None = None, x0s: torch.Tensor | None = None) -> None:
        """Insert B trajectories: states [B, T+1, *shape], rewards [B], conds [B, ...] or None, kls [B, T] or None,
        x0s (clean-sample estimates of every state) like states or None. Give kls and x0s always or never: the
        buffer keeps them from the first add that has them."""
        if states.shape[0] > self.capacity:  # only the newest `capacity` rows can stay
            drop = states.shape[0] - self.capacity
            self.inserted += drop
            states, rewards = states[drop:], rewards[drop:]
            conds = None if conds is None else conds[drop:]
            kls = None if kls is None else kls[drop:]
            x0s = None if x0s is None else x0s[drop:]
        b = states.shape[0]
        if states.shape[1] != self.num_steps + 1:
            raise ValueError(f"states have {states.shape[1]} states per chain, the buffer expects {self.num_steps + 1}")
        if self.states is None:
            self.states = torch.zeros((self.capacity, *states.shape[1:]), dtype=states.dtype, device=self.device)
            if conds is not None:
                self.conds = torch.zeros((self.capacity, *conds.shape[1:]), dtype=conds.dtype, device=self.device)
        if kls is not None:
            if kls.shape != (b, self.num_steps):
                raise ValueError(f"kls must have shape [{b}, {self.num_steps}], got {tuple(kls.shape)}")
            if self.kls is None:
                self.kls = torch.zeros((self.capacity, self.num_steps), dtype=torch.float32, device=self.device)
        if x0s is not None:
            if x0s.shape != states.shape:
                raise ValueError(f"x0s must have the states' shape {tuple(states.shape)}, got {tuple(x0s.shape)}")
            if self.x0s is None:
                self.x0s = torch.zeros((self.capacity, *x0s.shape[1:]), dtype=x0s.dtype, device=self.device)
        slots = (torch.arange(b, device=self.device) + self.inserted) % self.capacity
        self.states[slots] = states.detach().to(self.device)
        self.rewards[slots] = rewards.detach().to(self.device, self.rewards.dtype)
        if self.conds is not None and conds is not None:
            self.conds[slots] = conds.detach().to(self.device)
        if self.kls is not None and kls is not None:
            self.kls[slots] = kls.detach().to(self.device, self.kls.dtype)
        if self.x0s is not None and x0s is not None:
            self.x0s[slots] = x0s.detach().to(self.device, self.x0s.dtype)
        self.order[slots] = torch.arange(self.inserted, self.inserted + b, device=self.device)
        self.inserted += b

    def returns(self, alpha: float) -> torch.Tensor:
        """Soft returns-to-go G [N, T+1] of the stored chains: G_k = r - alpha sum_{s >= k} KL_s (G_T = r), the
        regression targets of a learned soft value at the state before step k."""
        n = len(self)
        if self.kls is None:
            raise RuntimeError("the buffer holds no step KLs: add trajectories with kls=")
        kls = self.kls[:n].to(torch.float64)
        to_go = torch.flip(torch.cumsum(torch.flip(kls, [1]), 1), [1])  # sum_{s >= k} KL_s, [N, T]
        to_go = torch.cat([to_go, torch.zeros(n, 1, dtype=to_go.dtype, device=to_go.device)], 1)
        return (self.rewards[:n].to(torch.float64)[:, None] - alpha * to_go).to(torch.float32)

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
            "kls": None if self.kls is None else self.kls.cpu(),
            "x0s": None if self.x0s is None else self.x0s.cpu(),
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
        self.kls = None if state.get("kls") is None else state["kls"].to(self.device)
        self.x0s = None if state.get("x0s") is None else state["x0s"].to(self.device)
        self.order = state["order"].to(self.device)
        self.inserted = int(state["inserted"])
