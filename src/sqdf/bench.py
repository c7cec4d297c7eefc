"""``sqdf bench``: every method on every task for several seeds at the same training reward-query budget.

Layout of the output folder DIR::

    DIR/runs/TASK/METHOD/seedS/   one ordinary run directory per run (summary.json, metrics.jsonl, samples, ...)
    DIR/results.json              one row per run: its summary.json keys, "curve" (its eval rows) and "run_dir"
    DIR/table.md                  one markdown table per task: mean ± sd over seeds, best per column in bold
    DIR/plots/                    regret_vs_queries_TASK.png, tradeoff.png, samples_TASK.png

A run whose directory already holds summary.json is reused, so an interrupted bench finishes when re-run.
The aggregation (rows -> table text) is pure and needs neither torch nor a run; torch and matplotlib are
imported only where runs are made or plots drawn, so pool workers set their thread count before torch loads.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

from .errors import ConfigError

DEFAULT_TASKS = ("gmm1", "gmm2", "mix25to9", "gaussian")
DEFAULT_QUERIES = 16384  # training reward queries per run
DEFAULT_SEEDS = 2  # seeds 0 .. K-1
DEFAULT_JOBS = 2  # worker processes (capped to os.cpu_count())
DEFAULT_EVAL_SAMPLES = 2048  # samples per evaluation
DEFAULT_OUT = "runs/bench-{timestamp}"
STEP_CAP = 1_000_000  # trainer.steps: the query budget, not the iteration count, ends a run
EVALS_PER_RUN = 4  # evaluations along the budget (trainer.eval_every_queries = queries // EVALS_PER_RUN)
SAMPLE_POINTS = 1000  # points per scatter in samples_TASK.png

CURVE_KEYS = ("reward_queries", "reward_mean", "path_kl", "regret", "x0_regret", "mode_tv")
MISSING = "—"


@dataclass(frozen=True)
class Column:
    """One table column: header, summary.json key, which mean is best ('max', 'min' or None) and number format."""

    header: str
    key: str
    best: str | None
    fmt: str


COLUMNS = (
    Column("reward", "reward_mean", "max", ".4f"),
    Column("path KL", "path_kl", None, ".4f"),
    Column("regret", "regret", "min", ".4f"),
    Column("x0 regret", "x0_regret", "min", ".4f"),
    Column("mode TV", "mode_tv", "min", ".3f"),
    Column("energy dist.", "energy_distance", "min", ".4f"),
    Column("train queries", "reward_queries", None, ".0f"),
    Column("queries/sample", "queries_per_sample", None, ".1f"),
    Column("seconds", "wall_seconds", None, ".1f"),
)


# ---- aggregation (pure) --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; None for one value) of n values."""

    mean: float
    sd: float | None
    n: int


def split_names(items) -> list[str]:
    """Names from space- and/or comma-separated items, in order, without repeats or empties."""
    names: list[str] = []
    for item in items or ():
        for name in re.split(r"[,\s]+", item.strip()):
            if name and name not in names:
                names.append(name)
    return names


def summarize(values) -> Stat | None:
    """Stat of the values that are not None; None when there are none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return Stat(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def format_stat(stat: Stat | None, fmt: str) -> str:
    """'mean ± sd' ('mean' for one value, '—' for none), both with the format spec fmt."""
    if stat is None:
        return MISSING
    if stat.sd is None:
        return format(stat.mean, fmt)
    return f"{format(stat.mean, fmt)} ± {format(stat.sd, fmt)}"


def best_indices(means, goal: str | None) -> set[int]:
    """Indices of the best means ('max' or 'min'; ties all count). None and NaN never win; empty for goal None
    or fewer than two means to compare."""
    finite = [(i, m) for i, m in enumerate(means) if m is not None and not math.isnan(m)]
    if goal is None or len(finite) < 2:
        return set()
    pick = max if goal == "max" else min
    target = pick(m for _, m in finite)
    return {i for i, m in finite if m == target}


def group_rows(rows) -> dict[str, dict[str, list[dict]]]:
    """rows -> {task: {method: [rows]}}, in first-seen order."""
    grouped: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        grouped.setdefault(row["task"], {}).setdefault(row["method"], []).append(row)
    return grouped


def _first(rows, get):
    for row in rows:
        value = get(row)
        if value is not None:
            return value
    return None


def _number(value, fmt: str = ".4f") -> str:
    return MISSING if value is None else format(value, fmt)


def task_heading(task: str, rows) -> str:
    """'### TASK (J* = ..., exact-score floor regret ...)' from the rows' optimum and floor."""
    ok = [r for r in rows if "error" not in r]
    optimum = _first(ok, lambda r: r.get("optimum"))
    floor = _first(ok, lambda r: (r.get("floor") or {}).get("regret"))
    return f"### {task} (J* = {_number(optimum)}, exact-score floor regret {_number(floor)})"


def task_table(task: str, by_method: dict[str, list[dict]], methods=None) -> str:
    """Markdown table of one task: a row per method, each cell mean ± sd over its successful seeds, the best
    mean of each ranked column in bold. Failed runs are left out of the cells and counted in the method cell."""
    methods = [m for m in (methods or by_method) if m in by_method]
    stats = {m: [summarize(r.get(c.key) for r in by_method[m] if "error" not in r) for c in COLUMNS]
             for m in methods}
    best = [best_indices([None if stats[m][j] is None else stats[m][j].mean for m in methods], c.best)
            for j, c in enumerate(COLUMNS)]
    lines = [task_heading(task, [r for m in methods for r in by_method[m]]), "",
             "| method | " + " | ".join(c.header for c in COLUMNS) + " |",
             "| --- |" + " ---: |" * len(COLUMNS)]
    for i, m in enumerate(methods):
        failed = sum("error" in r for r in by_method[m])
        label = m if not failed else f"{m} ({failed} of {len(by_method[m])} runs failed)"
        cells = []
        for j, c in enumerate(COLUMNS):
            text = format_stat(stats[m][j], c.fmt)
            cells.append(f"**{text}**" if i in best[j] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_tables(rows, tasks=None, methods=None) -> str:
    """One task_table per task (in the given order, else first-seen), separated by blank lines."""
    grouped = group_rows(rows)
    tasks = [t for t in (tasks or grouped) if t in grouped]
    return "\n".join(task_table(t, grouped[t], methods) for t in tasks)


def overview_table(rows, tasks=None, methods=None) -> str:
    """One markdown table: a row per method, a column per task, each cell 'regret (x0 regret)' as means over
    seeds; the lowest path regret of each task in bold."""
    grouped = group_rows(rows)
    tasks = [t for t in (tasks or grouped) if t in grouped]
    methods = [m for m in (methods or dict.fromkeys(r["method"] for r in rows))
               if any(m in grouped[t] for t in tasks)]
    cells = {m: [] for m in methods}
    for t in tasks:
        means = []
        for m in methods:
            ok = [r for r in grouped[t].get(m, []) if "error" not in r]
            means.append((summarize(r.get("regret") for r in ok), summarize(r.get("x0_regret") for r in ok)))
        best = best_indices([None if p is None else p.mean for p, _ in means], "min")
        for i, (m, (p, x)) in enumerate(zip(methods, means)):
            text = f"{_number(None if p is None else p.mean, '.3f')} ({_number(None if x is None else x.mean, '.3f')})"
            cells[m].append(f"**{text}**" if i in best else text)
    lines = ["Regret (x0 regret), mean over seeds; lower is better.", "",
             "| method | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    lines += [f"| {m} | " + " | ".join(cells[m]) + " |" for m in methods]
    return "\n".join(lines) + "\n"


def header_text(command: str, queries: int, seeds: int, eval_samples: int, machine: str) -> str:
    """The lines above the tables: the command, the budget, the seeds and the machine."""
    return (f"`{command}`\n\n"
            f"Budget: {queries} training reward queries per run; seeds 0..{seeds - 1} ({seeds}); "
            f"{eval_samples} evaluation samples; machine: {machine}.\n"
            "Cells: mean ± sd over seeds (ddof=1). Bold: best per column (max reward; min regret, x0 regret, "
            f"mode TV, energy distance). {MISSING}: not defined for the method.\n")


def curve_of(eval_rows) -> list[dict]:
    """The CURVE_KEYS of each eval row of metrics.jsonl (None where a row lacks one)."""
    return [{k: row.get(k) for k in CURVE_KEYS} for row in eval_rows]


def mean_curve(curves, key: str) -> tuple[list[float], list[float]]:
    """Mean over seeds of key against reward_queries: curves are lists of curve rows; a query count's mean uses
    the seeds that have a value there. Returns sorted queries and the means (both lists)."""
    at: dict[float, list[float]] = {}
    for curve in curves:
        for row in curve:
            if row.get(key) is not None and row.get("reward_queries") is not None:
                at.setdefault(row["reward_queries"], []).append(float(row[key]))
    xs = sorted(at)
    return xs, [statistics.fmean(at[x]) for x in xs]


def kl_values(rows) -> tuple[list[float], str]:
    """The KL used in the trade-off plot for one method's rows: path_kl when every row has it, else x0_kl."""
    if rows and all(r.get("path_kl") is not None for r in rows):
        return [float(r["path_kl"]) for r in rows], "path_kl"
    return [float(r["x0_kl"]) for r in rows if r.get("x0_kl") is not None], "x0_kl"


def config_differences(saved: dict, wanted: dict) -> list[str]:
    """'section.key: saved -> wanted' for every key whose value differs between two nested config dicts."""
    out = []
    for section in sorted(set(saved) | set(wanted)):
        a, b = saved.get(section) or {}, wanted.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def machine_text() -> str:
    """'PROCESSOR, N cores, torch VERSION' of this machine."""
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


# ---- runs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of the bench: where it goes and its full config (RunConfig.to_dict(), nested)."""

    task: str
    method: str
    seed: int
    run_dir: str
    config: dict = field(compare=False)

    @property
    def label(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"


def has_key(config, key: str) -> bool:
    """Whether a RunConfig has the key (``section.field``, or a bare field name of any section)."""
    keys = config.all_keys()
    return key in keys if "." in key else any(k.split(".", 1)[1] == key for k in keys)


def bench_config(method: str, task: str, seed: int, queries: int, eval_samples: int, overrides=()):
    """The RunConfig of one run: the task's presets, the settings tuned at the bench budget (tasks.BENCH_PRESETS),
    the bench settings, then those KEY=VALUE overrides whose key
    the method's config has (a method-specific key such as method.gamma skips the methods without it)."""
    from .config import parse_assignment
    from .trainer import default_config

    from .tasks import bench_presets

    config = default_config(method, task)
    config.update(bench_presets(task, method))
    settings = {"seed": seed, "max_queries": queries, "steps": STEP_CAP, "eval_every": 0,
                "eval_every_queries": max(1, queries // EVALS_PER_RUN), "eval_samples": eval_samples,
                "checkpoint_every": STEP_CAP, "tensorboard": False, "progress": False, "device": "cpu"}
    for key, value in settings.items():
        config.set(f"trainer.{key}", value, raw=False)
    for item in overrides:
        key, value = parse_assignment(item)
        if has_key(config, key):
            config.set(key, value)
    return config


def override_scope(methods, overrides) -> dict[str, list[str]]:
    """{override: methods whose config has its key}; raises the config's own ConfigError (with its
    did-you-mean hint) for a key no method has."""
    from .config import parse_assignment
    from .trainer import default_config

    scope = {}
    for item in overrides:
        key, value = parse_assignment(item)
        scope[item] = [m for m in methods if has_key(default_config(m), key)]
        if not scope[item]:
            default_config(methods[0]).set(key, value)  # raises: unknown config key ...
    return scope


def plan_runs(tasks, methods, seeds: int, queries: int, eval_samples: int, overrides, out: str) -> list[RunSpec]:
    """Every (task, method, seed) run with a validated config; raises ConfigError on any bad name or value."""
    from .trainer import make_task, method_class
    from .tasks import TaskConfig

    for task in tasks:
        make_task(task, TaskConfig())
    for method in methods:
        method_class(method)
    specs = []
    for task in tasks:
        for method in methods:
            for seed in range(seeds):
                config = bench_config(method, task, seed, queries, eval_samples, overrides)
                if seed == 0:
                    config.trainer.validate()
                    config.method.validate()
                    make_task(task, config.task)
                specs.append(RunSpec(task, method, seed, os.path.join(out, "runs", task, method, f"seed{seed}"),
                                     config.to_dict()))
    return specs


def load_row(run_dir: str) -> dict:
    """A finished run's result row: its summary.json, "curve" (from metrics.jsonl) and "run_dir"."""
    with open(os.path.join(run_dir, "summary.json")) as fh:
        row = json.load(fh)
    eval_rows = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as fh:
            eval_rows = [r for r in map(json.loads, filter(str.strip, fh)) if r.get("kind") == "eval"]
    row["curve"] = curve_of(eval_rows)
    row["run_dir"] = run_dir
    return row


def error_row(spec: RunSpec, error: str) -> dict:
    return {"task": spec.task, "method": spec.method, "seed": spec.seed, "run_dir": spec.run_dir, "error": error}


def run_one(spec: RunSpec) -> dict:
    """Make one run from scratch (a leftover unfinished directory is removed first) and return its row; any
    exception becomes an error row (its traceback goes to run_dir/error.txt) instead of propagating."""
    try:
        from .trainer import Trainer, default_config

        if os.path.isdir(spec.run_dir):
            shutil.rmtree(spec.run_dir)
        config = default_config(spec.method)
        config.update(spec.config)
        Trainer(spec.task, spec.method, config, spec.run_dir).train()
        return load_row(spec.run_dir)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the bench goes on
        os.makedirs(spec.run_dir, exist_ok=True)
        with open(os.path.join(spec.run_dir, "error.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        return error_row(spec, f"{type(exc).__name__}: {exc}")


def _init_worker() -> None:
    """Pool worker setup: one thread per run (the runs are tiny; the pool gives the parallelism)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def execute(specs, jobs: int) -> list[dict]:
    """Run specs (in a spawn process pool of `jobs` workers; in-process for jobs 1) with a progress bar naming
    each finished run. Returns rows in the order of specs."""
    from tqdm.auto import tqdm

    rows: dict[int, dict] = {}
    bar = tqdm(total=len(specs), desc="bench", unit="run", file=sys.stderr)

    def done(i: int, row: dict) -> None:
        rows[i] = row
        status = "FAILED" if "error" in row else "ok"
        bar.set_postfix_str(f"{specs[i].label} {status}")
        bar.update(1)
        if "error" in row:
            tqdm.write(f"sqdf bench: {specs[i].label} failed: {row['error']}", file=sys.stderr)

    try:
        if jobs <= 1:
            for i, spec in enumerate(specs):
                bar.set_description_str(f"bench: {spec.label}")
                done(i, run_one(spec))
        else:
            _execute_pool(specs, jobs, done)
    finally:
        bar.close()
    return [rows[i] for i in range(len(specs))]


def _execute_pool(specs, jobs: int, done) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        futures = {pool.submit(run_one, spec): i for i, spec in enumerate(specs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory (BrokenProcessPool)
                row = error_row(specs[i], f"{type(exc).__name__}: {exc}")
            done(i, row)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# ---- plots ---------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows) -> list[dict]:
    return [r for r in rows if "error" not in r]


def plot_regret_curves(task: str, by_method: dict[str, list[dict]], trains: dict[str, bool], path: str) -> None:
    """Regret and x0 regret against training reward queries (mean over seeds) for each trained method;
    inference-time methods as dashed horizontal lines at their final values, labelled with queries/sample."""
    plt = _plt()
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
        floor = _first(_ok([r for rows in by_method.values() for r in rows]),
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
    plt = _plt()
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


def _seed0_samples(rows):
    """The final samples [n, d] of the lowest-seed successful run (seed 0 normally), or None."""
    from safetensors.torch import load_file

    for row in sorted(_ok(rows), key=lambda r: r.get("seed", 0)):
        path = os.path.join(row["run_dir"], "samples.safetensors")
        if os.path.exists(path):
            return load_file(path)["samples"].flatten(1)
    return None


def plot_samples_grid(name: str, task, by_method: dict[str, list[dict]], path: str) -> None:
    """A grid with one scatter per method: its seed-0 final samples (first SAMPLE_POINTS) over target samples."""
    import torch

    plt = _plt()
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
    from .methods import METHODS

    grouped = {t: {m: ms[m] for m in methods if m in ms} for t, ms in group_rows(rows).items()
               if _ok(r for rs in ms.values() for r in rs)}
    trains = {m: getattr(METHODS.get(m), "trains", True) for m in methods}
    jobs = [(os.path.join(plots_dir, f"regret_vs_queries_{t}.png"), plot_regret_curves, (t, g, trains))
            for t, g in grouped.items()]
    jobs.append((os.path.join(plots_dir, "tradeoff.png"), plot_tradeoff, (grouped, tasks)))
    jobs += [(os.path.join(plots_dir, f"samples_{t}.png"), plot_samples_grid, (t, tasks[t], g))
             for t, g in grouped.items()]
    paths = []
    for path, plot, args in jobs:
        try:
            plot(*args, path)
            paths.append(path)
        except Exception as exc:  # noqa: BLE001 - the runs, results.json and table.md are worth more than a plot
            log(f"sqdf bench: warning: {os.path.basename(path)} failed ({type(exc).__name__}: {exc})")
    return paths


# ---- the bench -----------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    rows: list[dict]  # one per run, in (task, method, seed) order
    table: str  # the text of table.md
    written: list[str]  # results.json, table.md and the plots
    failed: list[dict]  # the error rows
    reused: int  # runs taken from an earlier bench in the same folder


def command_text(tasks, methods, queries, seeds, out, jobs, eval_samples, overrides) -> str:
    """The explicit `sqdf bench ...` command that reproduces a bench (every setting spelled out)."""
    argv = ["sqdf", "bench", *tasks, "--methods", ",".join(methods), "--queries", str(queries), "--seeds", str(seeds),
            "--eval-samples", str(eval_samples), "--jobs", str(jobs), "--out", out]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def run_bench(tasks=None, methods=None, queries: int = DEFAULT_QUERIES, seeds: int = DEFAULT_SEEDS,
              out: str | None = None, jobs: int = DEFAULT_JOBS, eval_samples: int = DEFAULT_EVAL_SAMPLES,
              overrides=(), log=print) -> BenchResult:
    """Run (or reuse) every method on every task for seeds 0..seeds-1 and write results.json, table.md and the
    plots into out. Bad names or values raise ConfigError before anything runs; failed runs become error rows."""
    from .methods import METHODS

    tasks = split_names(tasks) or list(DEFAULT_TASKS)
    methods = split_names(methods) or list(METHODS)
    for name, value in (("--queries", queries), ("--seeds", seeds), ("--jobs", jobs), ("--eval-samples", eval_samples)):
        if value < 1:
            raise ConfigError(f"{name} {value} must be >= 1")
    out = out or DEFAULT_OUT.format(timestamp=time.strftime("%Y%m%d-%H%M%S"))
    overrides = list(overrides)
    for item, where in override_scope(methods, overrides).items():
        if len(where) < len(methods):
            log(f"sqdf bench: --set {item} applies only to {', '.join(where)} (the other methods have no such key)")
    specs = plan_runs(tasks, methods, seeds, queries, eval_samples, overrides, out)

    done = [s for s in specs if os.path.exists(os.path.join(s.run_dir, "summary.json"))]
    todo = [s for s in specs if s not in done]
    rows_by_spec = {}
    for spec in done:
        rows_by_spec[spec] = load_row(spec.run_dir)
        differences = _saved_config_differences(spec)
        if differences:
            log(f"sqdf bench: warning: reused {spec.run_dir} was made with other settings ({'; '.join(differences)});"
                " delete it to run it again")
    workers = max(1, min(jobs, os.cpu_count() or 1, len(todo)))
    log(f"sqdf bench: {len(specs)} runs ({len(tasks)} tasks x {len(methods)} methods x {seeds} seeds) at "
        f"{queries} training reward queries each in {out}; reusing {len(done)} finished, running {len(todo)} "
        f"with {workers} worker(s)")
    if todo:
        rows_by_spec.update(zip(todo, execute(todo, workers)))
    rows = [rows_by_spec[s] for s in specs]

    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "results.json"), os.path.join(out, "table.md")]
    _write_text(written[0], json.dumps(rows, indent=1))
    command = command_text(tasks, methods, queries, seeds, out, jobs, eval_samples, overrides)
    table = header_text(command, queries, seeds, eval_samples, machine_text()) + "\n" + \
        overview_table(rows, tasks, methods) + "\n" + results_tables(rows, tasks, methods)
    _write_text(written[1], table)
    if any("error" not in r for r in rows):
        from .trainer import make_task

        task_objects = {t: make_task(t, _task_config(specs, t)) for t in tasks}
        written += write_plots(rows, task_objects, methods, os.path.join(out, "plots"), log)
    failed = [r for r in rows if "error" in r]
    return BenchResult(rows, table, written, failed, len(done))


def _task_config(specs, task: str):
    """The task section of the first run of a task (presets and --set applied), as a TaskConfig."""
    from .tasks import TaskConfig

    spec = next(s for s in specs if s.task == task)
    return TaskConfig(**spec.config["task"])


def _saved_config_differences(spec: RunSpec) -> list[str]:
    import yaml

    path = os.path.join(spec.run_dir, "config.yaml")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        saved = yaml.safe_load(fh) or {}
    return config_differences(saved.get("config") or {}, spec.config)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
