"""Pictures of samples against the target density and curves of a run's evaluations (matplotlib, written as PNG)."""

from __future__ import annotations

import os

import torch


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, imported on first use (so that importing a module that
    plots does not load matplotlib, e.g. in bench pool workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples_2d(samples: torch.Tensor, task, path: str, title: str = "", max_points: int = 2000) -> None:
    """Scatter the first two coordinates of samples [B, d] over the target's log-density contours (d == 2) or
    over exact target samples (d > 2). ``task`` must offer target_log_density and target_samples."""
    plt = pyplot()
    x = samples.detach().flatten(1).to(torch.float64).cpu()[:max_points]
    target = task.target_samples(max_points, torch.Generator().manual_seed(7)).flatten(1)
    both = torch.cat([x[:, :2], target[:, :2]])
    lo = torch.quantile(both, 0.005, dim=0) - 1.0
    hi = torch.quantile(both, 0.995, dim=0) + 1.0
    fig, ax = plt.subplots(figsize=(5.2, 5))
    if x.shape[1] == 2:
        gx = torch.linspace(float(lo[0]), float(hi[0]), 200, dtype=torch.float64)
        gy = torch.linspace(float(lo[1]), float(hi[1]), 200, dtype=torch.float64)
        xx, yy = torch.meshgrid(gx, gy, indexing="xy")
        grid = torch.stack([xx.flatten(), yy.flatten()], 1)
        with torch.no_grad():
            logp = task.target_log_density(grid).reshape(200, 200)
        density = torch.exp(logp - logp.max())
        ax.contourf(xx.numpy(), yy.numpy(), density.numpy(), levels=12, cmap="Blues")
    else:
        ax.scatter(target[:, 0], target[:, 1], s=3, c="tab:blue", alpha=0.3, label="exact target")
    ax.scatter(x[:, 0], x[:, 1], s=3, c="tab:red", alpha=0.5, label="samples")
    ax.set_xlim(float(lo[0]), float(hi[0]))
    ax.set_ylim(float(lo[1]), float(hi[1]))
    ax.set_title(title or task.name)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(eval_rows: list[dict], path: str, title: str = "", xlabel: str = "reward queries") -> None:
    """Reward, path KL, regret (when known) and the task's quality metrics (mode TV, energy distance; Frechet
    distance, diversity, target accuracy for images) against reward queries, from the eval rows of metrics.jsonl."""
    plt = pyplot()
    if not eval_rows:
        return
    q = [r["reward_queries"] for r in eval_rows]
    keys = [k for k in ("reward_mean", "path_kl", "regret", "mode_tv", "energy_distance", "frechet", "diversity",
                        "target_accuracy") if k in eval_rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot(q, [float("nan") if r.get(key) is None else r[key] for r in eval_rows], marker="o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
