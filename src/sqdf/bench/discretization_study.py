"""``sqdf bench --discretization 10,20,50,100``: every finished run of a bench re-evaluated under every sampler
(``discretization.SAMPLERS``) at every step count, written as DIR/discretization.md, DIR/discretization.json and
DIR/plots/discretization_TASK.png.

Each run's evaluation is cached in RUN_DIR/discretization.json (the exact-score floor of a task in
DIR/runs/TASK/discretization_floor.json) and reused while the settings and the run's summary.json are unchanged, so
re-running the bench is cheap.
The tables (rows -> text) are pure; torch and matplotlib are imported only where runs are evaluated or plots drawn.
"""

from __future__ import annotations

import json
import os
import statistics
import traceback
from dataclasses import dataclass

from .discretization import DEFAULT_SEED, FLOOR, KL_KINDS, SAMPLER_LABELS
from .tables import MISSING, first_value, format_stat, summarize

CACHE_NAME = "discretization.json"
REGRET_SAMPLERS = ("ddpm", "em", "heun")  # samplers with a path KL (the ODE has none)


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation: a finished run (or, method FLOOR, a task's exact score on a run's task config)."""

    task: str
    method: str
    seed: int
    run_dir: str
    steps: tuple
    samplers: tuple
    n: int
    cache: str

    @property
    def label(self) -> str:
        return f"{self.task}/{self.method}" + ("" if self.method == FLOOR else f"/seed{self.seed}")

    def key(self) -> dict:
        return {"steps": list(self.steps), "samplers": list(self.samplers), "n": self.n, "seed": DEFAULT_SEED}


def rediscretizable(method: str) -> bool:
    """Whether a registered method fine-tunes the task's standard policy (so any sampler can run its network)."""
    from ..methods import METHODS, Method

    cls = METHODS[method]
    return cls.trains and cls.build_policy.__func__ is Method.build_policy.__func__


def plan_evaluations(rows, steps, samplers, n: int, out: str, log=print) -> list[EvalSpec]:
    """An EvalSpec per successful run of a method that can be re-discretized, plus one floor per task (computed on
    the task config of its first run; no rows for a task without an exact target)."""
    specs, floors, skipped = [], {}, []
    for row in rows:
        if "error" in row:
            continue
        if not rediscretizable(row["method"]):
            if row["method"] not in skipped:
                skipped.append(row["method"])
            continue
        specs.append(EvalSpec(row["task"], row["method"], row["seed"], row["run_dir"], tuple(steps), tuple(samplers),
                              n, os.path.join(row["run_dir"], CACHE_NAME)))
        floors.setdefault(row["task"], row["run_dir"])
    if skipped:
        log(f"sqdf bench: --discretization skips {', '.join(skipped)} (no fine-tuned DDIM/SDE network to re-run)")
    for task, run_dir in floors.items():
        specs.append(EvalSpec(task, FLOOR, 0, run_dir, tuple(steps), tuple(samplers), n,
                              os.path.join(out, "runs", task, "discretization_floor.json")))
    return specs


def evaluate_spec(spec: EvalSpec) -> dict:
    """{"task", "method", "seed", "run_dir", "trained": [sampler, steps] or None, "settings": [rows]} of one spec,
    from its cache when the settings and the run match; any exception becomes {"error": ...} (its traceback in
    CACHE_error.txt next to the cache file)."""
    from . import discretization as disc

    head = {"task": spec.task, "method": spec.method, "seed": spec.seed, "run_dir": spec.run_dir}
    try:
        # the run's summary.json changes when the run is made again: then the cached evaluation is stale
        key = {**spec.key(), "run": os.stat(os.path.join(spec.run_dir, "summary.json")).st_mtime_ns}
        if os.path.exists(spec.cache):
            with open(spec.cache) as fh:
                cached = json.load(fh)
            if cached.get("key") == key:
                return {**head, "trained": cached["trained"], "settings": cached["settings"]}
        if spec.method == FLOOR:
            from ..training.run_setup import make_task, read_run_config

            task_name, _, config = read_run_config(spec.run_dir)
            task = make_task(task_name, config.task)
            policy = disc.exact_score_policy(task)  # None: no exact target (e.g. digits), so no floor rows
            trained = None
            settings = [] if policy is None else disc.evaluate_policy(policy, task, spec.steps, spec.samplers, spec.n)
        else:
            from ..training.saved_runs import load_run

            run = load_run(spec.run_dir)
            trained = list(disc.training_setting(run.method) or ()) or None
            settings = disc.evaluate_run(run, spec.steps, spec.samplers, spec.n)
        result = {"key": key, "trained": trained, "settings": settings}
        os.makedirs(os.path.dirname(os.path.abspath(spec.cache)), exist_ok=True)
        tmp = f"{spec.cache}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, spec.cache)
        return {**head, "trained": trained, "settings": settings}
    except Exception as exc:  # noqa: BLE001 - one failed evaluation is reported, the others go on
        try:
            with open(spec.cache.replace(".json", "_error.txt"), "w") as fh:
                fh.write(traceback.format_exc())
        except OSError:
            pass
        return {**head, "error": f"{type(exc).__name__}: {exc}"}


def flat_rows(results) -> list[dict]:
    """One row per (run, setting): the setting's metrics with task, method, seed, run_dir and train_sampler/steps."""
    out = []
    for res in results:
        if "error" in res:
            continue
        trained = res.get("trained") or [None, None]
        for s in res["settings"]:
            out.append({"task": res["task"], "method": res["method"], "seed": res["seed"], "run_dir": res["run_dir"],
                        "train_sampler": trained[0], "train_steps": trained[1], **s})
    return out


# ---- tables (pure) -------------------------------------------------------------------------------------------
def _cell_rows(rows, task, method, sampler, steps):
    return [r for r in rows if (r["task"], r["method"], r["sampler"], r["steps"]) == (task, method, sampler, steps)]


def _header(steps) -> list[str]:
    return ["| method | sampler | " + " | ".join(f"{t} steps" for t in steps) + " |",
            "| --- | --- |" + " ---: |" * len(steps)]


def _body(task, rows, methods, steps, samplers, cell) -> list[str]:
    """Table lines | method | sampler | cell(T1) | ... | with cell(rows of that cell) -> text; all-missing rows left
    out."""
    lines = []
    for m in methods:
        for s in samplers:
            cells = [cell(_cell_rows(rows, task, m, s, t)) for t in steps]
            if all(c == MISSING for c in cells):
                continue
            lines.append(f"| {m} | {SAMPLER_LABELS[s]} | " + " | ".join(cells) + " |")
    return lines


def _mark(cell_rows) -> str:
    return " †" if any(r.get("trained") for r in cell_rows) else ""


def _stat_cell(key: str, fmt: str, reward: bool = False):
    def cell(cell_rows) -> str:
        stat = summarize(r.get(key) for r in cell_rows)
        if stat is None:
            return MISSING
        text = format_stat(stat, fmt)
        if reward:
            r = summarize(row.get("reward_mean") for row in cell_rows)
            text += f" ({format(r.mean, '.3f')})"
        return text + _mark(cell_rows)

    return cell


def _delta_cell(key: str, fmt: str, rows, task: str, method: str):
    """Per-seed difference of key from the same seed's value at its training setting, mean ± sd over seeds."""
    base = {r["seed"]: r.get(key) for r in rows if r["task"] == task and r["method"] == method and r.get("trained")}

    def cell(cell_rows) -> str:
        diffs = [r.get(key) - base[r["seed"]] for r in cell_rows
                 if r.get(key) is not None and base.get(r["seed"]) is not None]
        if not diffs:
            return MISSING
        if any(r.get("trained") for r in cell_rows):
            return "0 †"
        stat = summarize(diffs)
        return ("+" if stat.mean >= 0 else "") + format_stat(stat, fmt)

    return cell


def trained_text(rows, task: str, methods) -> str:
    """'ddpo: DDPM 20, score-as-action: EM 20' from the rows' training settings."""
    parts = []
    for m in methods:
        r = first_value([r for r in rows if r["task"] == task and r["method"] == m],
                        lambda r: (r["train_sampler"], r["train_steps"]) if r.get("train_sampler") else None)
        if r is not None:
            parts.append(f"{m}: {SAMPLER_LABELS[r[0]]} {r[1]}")
    return ", ".join(parts)


def task_tables(task: str, rows, methods, steps, samplers) -> str:
    """The markdown of one task: regret (reward), x0 regret, change of x0 regret from the training setting, mode TV."""
    rows = [r for r in rows if r["task"] == task]
    methods = [m for m in methods if any(r["method"] == m for r in rows)]
    seeds = sorted({r["seed"] for r in rows if r["method"] != FLOOR})
    with_floor = methods + ([FLOOR] if any(r["method"] == FLOOR for r in rows) else [])
    optimum = first_value(rows, lambda r: r.get("optimum"))
    head = [f"### {task} (J* = {MISSING if optimum is None else format(optimum, '.4f')}; seeds "
            f"{', '.join(map(str, seeds))}; trained with {trained_text(rows, task, methods)})", ""]
    reg = [s for s in samplers if s in REGRET_SAMPLERS]
    out = head + ["Regret J* - (E[r] - alpha KL), mean ± sd over seeds, E[r] in parentheses. † the method's "
                  "training setting. Heun: KL is the Girsanov sum along its path (an estimate; can be too low at "
                  "few steps).", ""]
    out += _header(steps) + _body(task, rows, with_floor, steps, reg, _stat_cell("regret", ".3f", reward=True)) + [""]
    out += ["x0 regret J* - (E[r] - alpha KL(q(x0) || p_ref)), the KL by kNN from the samples: the same yardstick "
            "for every sampler.", ""]
    out += _header(steps) + _body(task, rows, with_floor, steps, samplers, _stat_cell("x0_regret", ".3f")) + [""]
    out += ["Change of x0 regret from the method's training setting (per seed, then mean ± sd over seeds); "
            "positive: worse.", ""]
    out += _header(steps)
    for m in methods:
        out += _body(task, rows, [m], steps, samplers, _delta_cell("x0_regret", ".3f", rows, task, m))
    out += [""]
    if any((r.get("mode_tv") or 0) > 0 for r in rows):
        out += ["Mode TV (total variation between mode weights and the target's).", ""]
        out += _header(steps) + _body(task, rows, with_floor, steps, samplers, _stat_cell("mode_tv", ".3f")) + [""]
    return "\n".join(out)


def stderr_text(rows) -> str:
    """One line on the per-run standard errors over the evaluation samples (median and max over all cells)."""
    parts = []
    for key, name in (("reward_stderr", "reward"), ("regret_stderr", "regret")):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            parts.append(f"{name} median {statistics.median(values):.4f}, max {max(values):.4f}")
    return ("Standard errors of one run's numbers over its evaluation samples: " + "; ".join(parts) + ". The ± in "
            "the cells is the sd over seeds (training noise), usually the larger.") if parts else ""


def discretization_markdown(rows, tasks, methods, steps, samplers, header: str = "") -> str:
    """The whole DIR/discretization.md text: header, the sampler legend and one section per task."""
    legend = ("Samplers: DDPM = the policy's own DDIM chain (its eta; 1 on the toy tasks, i.e. DDPM) rebuilt at T "
              "steps around the same networks (exact path KL); EM = Euler-Maruyama on the reverse SDE (exact path KL "
              "of the EM chain); Heun = stochastic Heun (KL: " + KL_KINDS["heun"] + "); ODE = probability-flow ODE "
              f"with Heun steps (no path KL: x0 metrics only). Rows '{FLOOR}': the exact target score through the "
              "same sampler (the regret of the discretization alone).")
    parts = [header.rstrip(), legend, stderr_text(rows), ""]
    parts += [task_tables(t, rows, methods, steps, samplers) for t in tasks if any(r["task"] == t for r in rows)]
    return "\n".join(p for p in parts if p is not None) + "\n"


# ---- plot ----------------------------------------------------------------------------------------------------
LINESTYLES = {"ddpm": "-", "em": "--", "heun": "-.", "ode": ":"}


def plot_discretization(task: str, rows, methods, samplers, path: str) -> None:
    """Regret and x0 regret against sampler steps (log x, symlog y), mean over seeds: a colour per method (grey: the
    exact-score floor), a line style per sampler; a star marks each method's training setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = [r for r in rows if r["task"] == task]
    steps = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    names = [m for m in methods if any(r["method"] == m for r in rows)] + [FLOOR]
    for ax, key, title in zip(axes, ("regret", "x0_regret"), ("regret (path KL; Heun: estimated KL)",
                                                              "x0 regret (kNN x0 KL)")):
        for k, m in enumerate(names):
            color = "0.5" if m == FLOOR else f"C{k % 10}"
            for s in samplers:
                pts = sorted({r["steps"] for r in rows if r["method"] == m and r["sampler"] == s})
                xs, ys, star = [], [], None
                for t in pts:
                    cell = _cell_rows(rows, task, m, s, t)
                    stat = summarize(r.get(key) for r in cell)
                    if stat is not None:
                        xs.append(t)
                        ys.append(stat.mean)
                        if any(r.get("trained") for r in cell):
                            star = (t, stat.mean)
                if xs:
                    ax.plot(xs, ys, LINESTYLES[s], marker="o", ms=3, color=color, label=f"{m} · {SAMPLER_LABELS[s]}")
                if star:
                    ax.plot(*star, "*", ms=14, color=color, markeredgecolor="k")
        ax.set_xscale("log")
        ax.set_xticks(steps)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("sampler steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{task}: regret against sampler steps (mean over seeds; star: the training setting)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the whole step of the bench -----------------------------------------------------------------------------
def run_discretization(bench_rows, steps, samplers, n: int, out: str, jobs: int, tasks, methods, header: str = "",
                       log=print) -> tuple[str, list[str], list[dict]]:
    """Evaluate every finished run of the bench (in parallel, cached) and write DIR/discretization.md, .json and
    the plots. Returns (markdown text, paths written, failed evaluations)."""
    from ..training.checkpoint import atomic_write_text
    from .pool import execute

    specs = plan_evaluations(bench_rows, steps, samplers, n, out, log)
    cached = sum(os.path.exists(s.cache) for s in specs)
    workers = max(1, min(jobs, os.cpu_count() or 1, len(specs)))
    log(f"sqdf bench: discretization: {len(specs)} evaluations ({len(samplers)} samplers x {len(steps)} step counts, "
        f"{n} samples each; {cached} cached) with {workers} worker(s)")
    results = execute(specs, workers, evaluate_spec) if specs else []
    failed = [r for r in results if "error" in r]
    for r in failed:
        log(f"sqdf bench: discretization of {r['task']}/{r['method']}/seed{r['seed']} failed: {r['error']}")
    rows = flat_rows(results)
    text = discretization_markdown(rows, tasks, methods, steps, samplers, header)
    written = [os.path.join(out, "discretization.md"), os.path.join(out, "discretization.json")]
    atomic_write_text(written[0], text)
    atomic_write_text(written[1], json.dumps({"steps": list(steps), "samplers": list(samplers), "samples": n,
                                        "seed": DEFAULT_SEED, "rows": rows,
                                        "failed": failed}, indent=1))
    for t in tasks:
        if not any(r["task"] == t for r in rows):
            continue
        path = os.path.join(out, "plots", f"discretization_{t}.png")
        try:
            plot_discretization(t, rows, methods, samplers, path)
            written.append(path)
        except Exception as exc:  # noqa: BLE001 - the tables are worth more than a plot
            log(f"sqdf bench: warning: {os.path.basename(path)} failed ({type(exc).__name__}: {exc})")
    return text, written, failed
