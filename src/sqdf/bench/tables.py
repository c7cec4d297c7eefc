"""The pure half of ``sqdf bench``: result rows (dicts from summary.json) -> mean ± sd tables, curves and stats.

Needs neither torch nor a run. A row has "task", "method", "seed", its summary keys and, for runs that failed,
"error"; tables leave failed runs out of their cells and count them in the method cell.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

CURVE_KEYS = ("reward_queries", "reward_mean", "path_kl", "regret", "x0_regret", "mode_tv", "frechet", "diversity",
              "target_accuracy")
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
    Column("spread", "spread_ratio", None, ".3f"),
    Column("target acc.", "target_accuracy", "max", ".3f"),
    Column("Frechet", "frechet", "min", ".2f"),
    Column("diversity", "diversity", None, ".2f"),
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


def first_value(rows, get):
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
    optimum = first_value(ok, lambda r: r.get("optimum"))
    floor = first_value(ok, lambda r: (r.get("floor") or {}).get("regret"))
    return f"### {task} (J* = {_number(optimum)}, exact-score floor regret {_number(floor)})"


def task_table(task: str, by_method: dict[str, list[dict]], methods=None) -> str:
    """Markdown table of one task: a row per method, each cell mean ± sd over its successful seeds, the best
    mean of each ranked column in bold. Failed runs are left out of the cells and counted in the method cell."""
    methods = [m for m in (methods or by_method) if m in by_method]
    all_stats = {m: [summarize(r.get(c.key) for r in by_method[m] if "error" not in r) for c in COLUMNS]
                 for m in methods}
    keep = [j for j in range(len(COLUMNS)) if any(all_stats[m][j] is not None for m in methods)] or \
        list(range(len(COLUMNS)))  # a column no run reports (e.g. mode TV on images) is left out
    columns = [COLUMNS[j] for j in keep]
    stats = {m: [all_stats[m][j] for j in keep] for m in methods}
    best = [best_indices([None if stats[m][j] is None else stats[m][j].mean for m in methods], c.best)
            for j, c in enumerate(columns)]
    lines = [task_heading(task, [r for m in methods for r in by_method[m]]), "",
             "| method | " + " | ".join(c.header for c in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for i, m in enumerate(methods):
        failed = sum("error" in r for r in by_method[m])
        label = m if not failed else f"{m} ({failed} of {len(by_method[m])} runs failed)"
        cells = []
        for j, c in enumerate(columns):
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
