"""``sqdf bench --blackbox BUDGET``: the proxy loop against its rivals at the same oracle budget, over seeds.

An entry names what spends the budget:

- ``METHOD``           the proxy loop with METHOD as the inner optimizer (``sqdf``, ``ddpo``, ...);
- ``METHOD:direct``    METHOD trained on the noisy oracle itself (no proxy);
- ``best_of_n:N``      best-of-N selection by the oracle's labels (``budget // N`` outputs).

Every run is an ordinary ``sqdf blackbox`` run directory (DIR/runs/TASK/ENTRY/seedS), reused when it holds a
finished ``blackbox.jsonl``; a run killed half-way is resumed from its folder. DIR/results.json holds one row per
run (its last evaluation plus "curve", the rows of every evaluation), DIR/table.md one table per task (mean ± sd
over seeds at the full budget) and DIR/plots/blackbox_TASK.png true reward, regret and a diversity metric
against oracle queries. Inner runs use the task's `sqdf bench` settings (tasks.BENCH_PRESETS).
"""

from __future__ import annotations

import json
import os
import shlex
import time
import traceback
from dataclasses import dataclass, field

from ..errors import ConfigError

# the proxy loop's inner method is the published SQDF, whose settings were tuned at 1024 labels (BENCHMARKS.md);
# the learned-soft-value default of `--method sqdf` is not measured in this loop yet
DEFAULT_ENTRIES = ("sqdf-paper", "ddpo:direct", "prdp:direct", "best_of_n:8")
DEFAULT_TASKS = ("gmm1",)
DEFAULT_BUDGET = 1024
# Settings tuned at a budget of 1024 oracle labels (seed 0, a few values each; BENCHMARKS.md), per task and entry
# label, applied on top of tasks.BENCH_PRESETS and below --set. Sections are config sections plus "blackbox"
# (BlackboxConfig fields such as inner_steps).
_MIXTURE_BLACKBOX = {  # tuned on gmm1; mix25to9 and gmm2 use them untuned
    "sqdf-paper": {"blackbox": {"inner_steps": 200}},
    "ddpo:direct": {"method": {"batch_size": 32, "lr": 3e-3, "clip_range": 1e-2}},
    "prdp:direct": {"method": {"batch_size": 32, "lr": 3e-3}},
}
BLACKBOX_PRESETS: dict[str, dict[str, dict]] = {
    "gmm1": _MIXTURE_BLACKBOX, "gmm2": _MIXTURE_BLACKBOX, "mix25to9": _MIXTURE_BLACKBOX,
    "digits": {
        "sqdf-paper": {"method": {"lr": 1e-5}, "blackbox": {"inner_steps": 100}},
        "ddpo:direct": {"method": {"batch_size": 32, "lr": 1e-5, "clip_range": 1e-2}},
        "prdp:direct": {"method": {"batch_size": 32, "lr": 1e-5}},
    },
}
CURVE_KEYS = ("reward_queries", "reward_mean", "path_kl", "regret", "mode_tv", "energy_distance", "frechet",
              "diversity", "target_accuracy")


@dataclass(frozen=True)
class Entry:
    """What spends one run's oracle budget: kind 'proxy', 'direct' or 'best_of' (with n candidates)."""

    method: str
    kind: str
    n: int = 0

    @property
    def label(self) -> str:
        return {"proxy": self.method, "direct": f"{self.method}:direct", "best_of": f"best_of_n:{self.n}"}[self.kind]


def parse_entry(text: str) -> Entry:
    """'sqdf' -> proxy loop, 'ddpo:direct' -> direct, 'best_of_n:8' -> best-of-8 (raises ConfigError)."""
    from ..training.run_setup import method_class

    name, _, suffix = text.partition(":")
    if name == "best_of_n":
        try:
            n = int(suffix or 8)
        except ValueError as exc:
            raise ConfigError(f"blackbox entry {text!r}: write best_of_n:N with an integer N, e.g. best_of_n:8") from exc
        return Entry("best_of_n", "best_of", n)
    if suffix not in ("", "direct"):
        raise ConfigError(f"blackbox entry {text!r}: the suffix must be ':direct' (e.g. ddpo:direct) or nothing "
                          "(the proxy loop)")
    cls = method_class(name)
    if not cls.trains:
        raise ConfigError(f"blackbox entry {text!r}: {name} does not train; inference-time baselines are entered "
                          "as best_of_n:N")
    return Entry(name, "direct" if suffix else "proxy")


@dataclass(frozen=True)
class BlackboxSpec:
    """One run: task, entry, seed, folder, the inner run's config (nested dict) and the BlackboxConfig fields."""

    task: str
    entry: Entry
    seed: int
    run_dir: str
    config: dict = field(compare=False)
    blackbox: dict = field(compare=False)

    @property
    def method(self) -> str:
        """The entry's label, the 'method' of the result rows and tables."""
        return self.entry.label

    @property
    def label(self) -> str:
        return f"{self.task}/{self.entry.label}/seed{self.seed}"


def spec_for(task: str, entry: Entry, seed: int, budget: int, eval_samples: int, overrides, out: str,
             settings: dict) -> BlackboxSpec:
    """The validated spec of one run: task presets, bench presets of the inner method, BLACKBOX_PRESETS of the
    entry, quiet CPU settings, then the overrides whose key the method's config has; ``settings`` (BlackboxConfig
    fields given on the command line) win over the entry's preset."""
    from ..blackbox.run_folder import BlackboxConfig
    from ..config import parse_assignment
    from ..tasks import bench_presets
    from ..training.run_setup import default_config, make_task
    from .runs import has_key

    preset = BLACKBOX_PRESETS.get(task, {}).get(entry.label, {})
    config = default_config(entry.method, task)
    config.update(bench_presets(task, entry.method))
    config.update({k: v for k, v in preset.items() if k != "blackbox"})
    config.update({"trainer": {"seed": seed, "device": "cpu", "progress": False, "tensorboard": False,
                               "plots": False, "eval_every": 0, "eval_samples": 64, "checkpoint_every": 10**9}})
    for item in overrides:
        key, value = parse_assignment(item)
        if has_key(config, key):
            config.set(key, value)
    bb = BlackboxConfig(budget=budget, eval_samples=eval_samples, seed=seed,
                        **{**preset.get("blackbox", {}), **settings})
    bb.validate()
    config.trainer.validate()
    config.method.validate()
    if seed == 0:
        make_task(task, config.task)
    folder = entry.label.replace(":", "-")
    return BlackboxSpec(task, entry, seed, os.path.join(out, "runs", task, folder, f"seed{seed}"), config.to_dict(),
                        bb.__dict__.copy())


def _build(spec: BlackboxSpec):
    from ..blackbox.baselines import BestOfNRun, DirectRun
    from ..blackbox.loop import BlackboxRun
    from ..blackbox.run_folder import BlackboxConfig
    from ..training.run_setup import default_config

    config = default_config(spec.entry.method)
    config.update(spec.config)
    bb = BlackboxConfig(**spec.blackbox)
    if spec.entry.kind == "best_of":
        return BestOfNRun(spec.task, config, bb, spec.run_dir, spec.entry.n)
    cls = DirectRun if spec.entry.kind == "direct" else BlackboxRun
    return cls(spec.task, spec.entry.method, config, bb, spec.run_dir)


def finished_rows(spec: BlackboxSpec) -> list[dict] | None:
    """The evaluation rows of a finished run (None when it has not finished)."""
    path = os.path.join(spec.run_dir, "blackbox.jsonl")
    done = os.path.join(spec.run_dir, "finished.json")
    if not os.path.exists(done) or not os.path.exists(path):
        return None
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def result_row(spec: BlackboxSpec, rows: list[dict], seconds: float | None) -> dict:
    """The row of results.json: the last evaluation's numbers (queries as reward_queries), the curve, the run."""
    last = rows[-1]
    row = {"task": spec.task, "method": spec.entry.label, "seed": spec.seed, "run_dir": spec.run_dir,
           **{k: v for k, v in last.items() if k not in ("round", "queries")},
           "reward_queries": last["queries"], "queries_per_sample": spec.entry.n if spec.entry.kind == "best_of" else 0,
           "curve": [{"reward_queries": r["queries"], **{k: r.get(k) for k in CURVE_KEYS[1:]}} for r in rows]}
    if seconds is not None:
        row["wall_seconds"] = seconds
    return row


def run_blackbox_one(spec: BlackboxSpec) -> dict:
    """Make (or finish) one run and return its result row; an exception becomes an error row."""
    from ..blackbox.resume import resume_run
    from ..training.checkpoint import atomic_write_text
    from .pool import error_row

    try:
        rows = finished_rows(spec)
        if rows is not None:
            with open(os.path.join(spec.run_dir, "finished.json")) as fh:
                return result_row(spec, rows, json.load(fh).get("wall_seconds"))
        start = time.time()
        if os.path.exists(os.path.join(spec.run_dir, "blackbox.yaml")):
            run = resume_run(spec.run_dir)  # a killed run: its paid-for labels are reused
        else:
            run = _build(spec)
        rows = run.run()
        seconds = time.time() - start
        atomic_write_text(os.path.join(spec.run_dir, "finished.json"), json.dumps({"wall_seconds": seconds}))
        return result_row(spec, rows, seconds)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the bench goes on
        os.makedirs(spec.run_dir, exist_ok=True)
        with open(os.path.join(spec.run_dir, "error.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        return error_row(spec, f"{type(exc).__name__}: {exc}")


def command_text(tasks, entries, budget, seeds, out, jobs, eval_samples, overrides, settings) -> str:
    argv = ["sqdf", "bench", *tasks, "--blackbox", str(budget), "--methods", ",".join(e.label for e in entries),
            "--seeds", str(seeds), "--eval-samples", str(eval_samples), "--jobs", str(jobs), "--out", out]
    flags = {"round_shares": "--rounds", "inner_steps": "--inner-steps", "noise_std": "--noise"}
    for key, flag in flags.items():
        if key in settings:
            argv += [flag, str(settings[key])]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def plot_blackbox(task: str, by_entry: dict[str, list[dict]], path: str) -> None:
    """True reward, regret and a diversity metric against oracle queries (mean over seeds, ± sd band)."""
    import statistics

    from ..evaluation.plots import pyplot

    plt = pyplot()
    ok = {m: [r for r in rows if "error" not in r] for m, rows in by_entry.items()}
    metric = next((k for k in ("mode_tv", "diversity", "energy_distance")
                   if any(c.get(k) is not None for rows in ok.values() for r in rows for c in r["curve"])), None)
    keys = [("reward_mean", "true reward"), ("regret", "regret J* - J")] + ([(metric, metric)] if metric else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6))
    for ax, (key, title) in zip(axes, keys):
        for k, (entry, rows) in enumerate(ok.items()):
            at: dict[float, list[float]] = {}
            for row in rows:
                for c in row["curve"]:
                    if c.get(key) is not None:
                        at.setdefault(c["reward_queries"], []).append(float(c[key]))
            xs = sorted(at)
            if not xs:
                continue
            mean = [statistics.fmean(at[x]) for x in xs]
            sd = [statistics.stdev(at[x]) if len(at[x]) > 1 else 0.0 for x in xs]
            ax.plot(xs, mean, marker="o", ms=3, color=f"C{k % 10}", label=entry)
            ax.fill_between(xs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=f"C{k % 10}", alpha=0.15)
        ax.set_xlabel("oracle queries")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{task}: black-box optimization at a query budget (mean ± sd over seeds)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_blackbox_bench(tasks=None, entries=None, budget: int = DEFAULT_BUDGET, seeds: int = 2, out: str | None = None,
                       jobs: int = 2, eval_samples: int = 512, overrides=(), settings: dict | None = None,
                       log=print):
    """Every entry on every task for seeds 0..seeds-1 at the same oracle budget; writes results.json, table.md
    and plots/blackbox_TASK.png into out and returns a bench.BenchResult. ``settings``: BlackboxConfig fields
    shared by every run (round_shares, inner_steps, noise_std, proxy, ...)."""
    from ..training.checkpoint import atomic_write_text
    from .pool import execute, machine_text
    from .runs import BenchResult
    from .tables import group_rows, results_tables, split_names

    tasks = split_names(tasks) or list(DEFAULT_TASKS)
    parsed = [parse_entry(e) for e in (split_names(entries) or list(DEFAULT_ENTRIES))]
    for name, value in (("--blackbox", budget), ("--seeds", seeds), ("--jobs", jobs), ("--eval-samples", eval_samples)):
        if value < 1:
            raise ConfigError(f"{name} {value} must be >= 1")
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    out = out or f"runs/bench-blackbox-{time.strftime('%Y%m%d-%H%M%S')}"
    specs = [spec_for(t, e, s, budget, eval_samples, overrides, out, settings)
             for t in tasks for e in parsed for s in range(seeds)]
    done = sum(finished_rows(s) is not None for s in specs)
    workers = max(1, min(jobs, os.cpu_count() or 1, len(specs) - done or 1))
    log(f"sqdf bench --blackbox: {len(specs)} runs ({len(tasks)} tasks x {len(parsed)} entries x {seeds} seeds) at "
        f"{budget} oracle queries each in {out}; reusing {done} finished, {workers} worker(s)")
    rows = execute(specs, workers, runner=run_blackbox_one)

    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "results.json"), os.path.join(out, "table.md")]
    atomic_write_text(written[0], json.dumps(rows, indent=1))
    labels = [e.label for e in parsed]
    command = command_text(tasks, parsed, budget, seeds, out, jobs, eval_samples, overrides, settings)
    header = (f"`{command}`\n\nBudget: {budget} oracle queries per run (noisy labels); seeds 0..{seeds - 1}; "
              f"{eval_samples} samples per true-reward evaluation; machine: {machine_text()}.\n"
              "Cells: mean ± sd over seeds at the full budget; reward is the TRUE (noise-free) reward. best_of_n:N "
              "has budget // N outputs in all; the fine-tuned policies sample without further queries. Settings: "
              "tasks.BENCH_PRESETS, then blackbox.bench.BLACKBOX_PRESETS (tuned at 1024 labels), then --set.\n")
    table = header + "\n" + results_tables(rows, tasks, labels)
    atomic_write_text(written[1], table)
    for task, by_entry in group_rows(rows).items():
        if any("error" not in r for rs in by_entry.values() for r in rs):
            path = os.path.join(out, "plots", f"blackbox_{task}.png")
            try:
                plot_blackbox(task, {m: by_entry[m] for m in labels if m in by_entry}, path)
                written.append(path)
            except Exception as exc:  # noqa: BLE001 - the runs and the table are worth more than a plot
                log(f"sqdf bench: warning: {os.path.basename(path)} failed ({type(exc).__name__}: {exc})")
    return BenchResult(rows, table, written, [r for r in rows if "error" in r], done)
