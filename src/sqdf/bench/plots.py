"""The plots of ``sqdf bench`` (DIR/plots/): regret against queries per task, the reward-KL trade-off, and
samples of every method against the target. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
import os

from ..evaluation.plots import pyplot
from .tables import first_value, group_rows, kl_values, mean_curve, summarize

SAMPLE_POINTS = 1000  # points per scatter in samples_TASK.png


def _ok(rows) -> list[dict]:
    return [r for r in rows if "error" not in r]


def plot_regret_curves(task: str, by_method: dict[str, list[dict]], trains: dict[str, bool], path: str) -> None:
    """Regret and x0 regret against training reward queries (mean over seeds) for each trained method;
    inference-time methods as dashed horizontal lines at their final values, labelled with queries/sample."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("regret", "x0_regret"), ("regret (path KL)", "x0 regret (kNN x0 KL)")):
        for k, (method, rows) in enumerate(by_method.items()):
            rows = _ok(rows)
            color = f"C{k % 10}"
            if trains.get(method, True):
                xs, ys = mean_curve([r.get("curve") or [] for r in rows], key)
                if xs:
                    ax.plot(xs, ys, marker="o", ms=3, color=color, label=method)
            else:
                final = summarize(r.get(key) for r in rows)
                qps = summarize(r.get("queries_per_sample") for r in rows)
                if final is not None:
                    ax.axhline(final.mean, ls="--", color=color,
                               label=f"{method} ({0 if qps is None else qps.mean:g} queries/sample)")
        floor = first_value(_ok([r for rows in by_method.values() for r in rows]),
                       lambda r: (r.get("floor") or {}).get("regret"))
        if key == "regret" and floor is not None:
            title += f"; exact-score floor {floor:.4g}"
            low, high = ax.get_ylim()
            if ax.lines and low <= floor <= high:  # a floor far above the curves would flatten them
                ax.axhline(floor, ls=":", color="0.4", label="exact-score floor")
        ax.set_xlabel("training reward queries")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{task}: regret J* - J against the training budget (mean over seeds)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tradeoff(grouped: dict[str, dict[str, list[dict]]], tasks: dict, path: str) -> None:
    """One panel per task: mean reward against mean KL per method (error bars: sd over seeds), the optimum
    (KL*, E*[r]) and the iso-objective line r = J* + alpha KL through it. tasks: name -> Task."""
    plt = pyplot()
    names = list(grouped)
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        task = tasks.get(name)
        opt = _known_optimum(task)
        known = opt is not None and opt.kl is not None and opt.reward_mean is not None
        # zoom on the optimum: methods whose KL is past 3 KL* are named in the legend instead of stretching the axes
        x_window = 3.0 * opt.kl if known else math.inf
        kl_max, shown = 0.0, [opt.reward_mean] if known else []
        for k, (method, rows) in enumerate(grouped[name].items()):
            rows = _ok(rows)
            kls, kind = kl_values(rows)
            kl, reward = summarize(kls), summarize(r.get("reward_mean") for r in rows)
            if kl is None or reward is None:
                continue
            label = method + ("" if kind == "path_kl" else " (x0 KL: no path KL)")
            if kl.mean > x_window:
                ax.plot([], [], "o", color=f"C{k % 10}", label=f"{method}: off scale (KL {kl.mean:.3g}, "
                                                                f"reward {reward.mean:.3g})")
                continue
            kl_max = max(kl_max, kl.mean + (kl.sd or 0.0))
            shown.append(reward.mean)
            ax.errorbar(kl.mean, reward.mean, xerr=kl.sd or 0.0, yerr=reward.sd or 0.0, fmt="o", capsize=3,
                        color=f"C{k % 10}", label=label)
        if known:
            import numpy as np

            xs = np.linspace(0.0, 1.15 * max(kl_max, opt.kl, 1e-3), 50)
            low, high = min(shown), max(shown)
            pad = 0.1 * max(high - low, 0.1)
            ax.set_ylim(low - pad, high + pad)
            ax.plot(xs, opt.optimum + task.alpha * xs, "k--", lw=0.8, label=f"r = J* + {task.alpha:g} KL")
            ax.plot([opt.kl], [opt.reward_mean], "k*", ms=13, label="optimum (KL*, E*[r])")
        ax.set_xlabel("KL to the base (path KL; x0 KL where marked)")
        ax.set_ylabel("mean reward")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _known_optimum(task):
    """task.known_optimum(), or None when the task has none or computing it fails (e.g. a reward that raises)."""
    try:
        return None if task is None else task.known_optimum()
    except Exception:  # noqa: BLE001 - the panel is drawn without the optimum
        return None


def _seed0_samples(rows, flat: bool = True):
    """The final samples ([n, d], or as saved with flat=False) of the lowest-seed successful run, or None."""
    from safetensors.torch import load_file

    for row in sorted(_ok(rows), key=lambda r: r.get("seed", 0)):
        path = os.path.join(row["run_dir"], "samples.safetensors")
        if os.path.exists(path):
            samples = load_file(path)["samples"]
            return samples.flatten(1) if flat else samples
    return None


def plot_image_samples_grid(name: str, task, by_method: dict[str, list[dict]], path: str, per_row: int = 16) -> None:
    """Image tasks: one row per method (its seed-0 final samples) and a last row of exact-target samples."""
    import torch

    from ..digits.pictures import draw_image

    plt = pyplot()
    rows = [(m, _seed0_samples(by_method[m], flat=False)) for m in by_method]
    if hasattr(task, "target_samples"):
        target = task.target_samples(torch.Generator().manual_seed(0))
        rows.append(("exact target", target[0] if isinstance(target, tuple) else target))
    fig, axes = plt.subplots(len(rows), per_row, figsize=(0.45 * per_row + 1.2, 0.5 * len(rows) + 0.5),
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for j in range(per_row):
            shown = imgs is not None and j < imgs.shape[0]
            draw_image(axes[r, j], ((imgs[j].float() + 1) / 2).clamp(0, 1) if shown else None)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{name}: seed-0 final samples per method", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_samples_grid(name: str, task, by_method: dict[str, list[dict]], path: str) -> None:
    """A grid with one scatter per method: its seed-0 final samples (first SAMPLE_POINTS) over target samples."""
    import torch

    plt = pyplot()
    methods = list(by_method)
    cols = min(len(methods), 4)
    nrows = math.ceil(len(methods) / cols)
    target = task.target_samples(SAMPLE_POINTS, torch.Generator().manual_seed(0)).flatten(1).to(torch.float32)
    samples = {m: _seed0_samples(by_method[m]) for m in methods}
    both = torch.cat([target[:, :2]] + [s[:SAMPLE_POINTS, :2] for s in samples.values() if s is not None])
    both = both[torch.isfinite(both).all(1)]
    lo = torch.quantile(both, 0.005, dim=0) - 1.0
    hi = torch.quantile(both, 0.995, dim=0) + 1.0
    fig, axes = plt.subplots(nrows, cols, figsize=(max(3.2 * cols, 4.8), 3.2 * nrows + 0.3), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        ax.scatter(target[:, 0], target[:, 1], s=2, c="tab:blue", alpha=0.25, label="target")
        x = samples[method]
        if x is None:
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
        else:
            x = x[:SAMPLE_POINTS]
            ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.5, label="samples")
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7, loc="upper right", markerscale=3)
    fig.suptitle(f"{name}: seed-0 final samples (red) over target samples (blue)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(rows, tasks: dict, methods, plots_dir: str, log=print) -> list[str]:
    """All plots of the bench into plots_dir (tasks with no successful run are left out); returns the paths
    written. tasks: name -> Task. A plot that fails is reported through log and skipped."""
    from ..methods import METHODS

    grouped = {t: {m: ms[m] for m in methods if m in ms} for t, ms in group_rows(rows).items()
               if _ok(r for rs in ms.values() for r in rs)}
    trains = {m: getattr(METHODS.get(m), "trains", True) for m in methods}
    jobs = [(os.path.join(plots_dir, f"regret_vs_queries_{t}.png"), plot_regret_curves, (t, g, trains))
            for t, g in grouped.items()]
    jobs.append((os.path.join(plots_dir, "tradeoff.png"), plot_tradeoff, (grouped, tasks)))
    jobs += [(os.path.join(plots_dir, f"samples_{t}.png"),
              plot_image_samples_grid if len(getattr(tasks[t], "sample_shape", ())) == 3 else plot_samples_grid,
              (t, tasks[t], g)) for t, g in grouped.items()]
    paths = []
    for path, plot, args in jobs:
        try:
            plot(*args, path)
            paths.append(path)
        except Exception as exc:  # noqa: BLE001 - the runs, results.json and table.md are worth more than a plot
            log(f"sqdf bench: warning: {os.path.basename(path)} failed ({type(exc).__name__}: {exc})")
    return paths
