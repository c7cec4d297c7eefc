"""``sqdf bench``: every method on every task for several seeds at the same training reward-query budget.

Layout of the output folder DIR::

    DIR/runs/TASK/METHOD/seedS/   one ordinary run directory per run (summary.json, metrics.jsonl, samples, ...)
    DIR/results.json              one row per run: its summary.json keys, "curve" (its eval rows) and "run_dir"
    DIR/table.md                  one markdown table per task: mean ± sd over seeds, best per column in bold
    DIR/plots/                    regret_vs_queries_TASK.png, tradeoff.png, samples_TASK.png (plots.py)

A run whose directory already holds summary.json is reused, so an interrupted bench finishes when re-run.
The aggregation (rows -> table text) is pure and lives in tables.py; torch and matplotlib are
imported only where runs are made or plots drawn, so pool workers set their thread count before torch loads.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
import traceback
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..training.checkpoint import atomic_write_text
from .pool import error_row, execute, machine_text
from .tables import curve_of, header_text, overview_table, results_tables, split_names

DEFAULT_TASKS = ("gmm1", "gmm2", "mix25to9", "gaussian")
DEFAULT_QUERIES = 16384  # training reward queries per run
DEFAULT_SEEDS = 2  # seeds 0 .. K-1
DEFAULT_JOBS = 2  # worker processes (capped to os.cpu_count())
DEFAULT_EVAL_SAMPLES = 2048  # samples per evaluation
DEFAULT_OUT = "runs/bench-{timestamp}"
STEP_CAP = 1_000_000  # trainer.steps: the query budget, not the iteration count, ends a run
EVALS_PER_RUN = 4  # evaluations along the budget (trainer.eval_every_queries = queries // EVALS_PER_RUN)

def config_differences(saved: dict, wanted: dict) -> list[str]:
    """'section.key: saved -> wanted' for every key whose value differs between two nested config dicts."""
    out = []
    for section in sorted(set(saved) | set(wanted)):
        a, b = saved.get(section) or {}, wanted.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


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


def task_variant(label: str) -> tuple[str, float | None]:
    """A bench task label ``TASK`` or ``TASK@ALPHA`` (the task at another KL weight) as (task name, alpha or None)."""
    name, sep, alpha = label.partition("@")
    if not sep:
        return label, None
    try:
        value = float(alpha)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise ConfigError(f"bench task {label!r}: the KL weight after '@' must be a positive number, e.g. {name}@0.3")
    return name, value


def with_alphas(tasks, alphas) -> list[str]:
    """Every task at every KL weight of ``alphas`` ('0.1,0.3,1,3' or a list) as TASK@ALPHA labels."""
    values = split_names([alphas]) if isinstance(alphas, str) else [str(a) for a in alphas]
    if not values:
        raise ConfigError("--alphas needs KL weights, e.g. --alphas 0.1,0.3,1,3")
    weights = [task_variant(f"--alphas@{a}")[1] for a in values]
    return [f"{task}@{a:g}" for task in tasks for a in weights]


def has_key(config, key: str) -> bool:
    """Whether a RunConfig has the key (``section.field``, or a bare field name of any section)."""
    keys = config.all_keys()
    return key in keys if "." in key else any(k.split(".", 1)[1] == key for k in keys)


def bench_config(method: str, task: str, seed: int, queries: int, eval_samples: int, overrides=()):
    """The RunConfig of one run: the task's presets, the settings tuned at the bench budget (tasks.BENCH_PRESETS),
    the bench settings, then those KEY=VALUE overrides whose key
    the method's config has (a method-specific key such as method.gamma skips the methods without it)."""
    from ..config import parse_assignment
    from ..tasks import bench_presets
    from ..training.run_setup import default_config

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
    from ..config import parse_assignment
    from ..training.run_setup import default_config

    scope = {}
    for item in overrides:
        key, value = parse_assignment(item)
        scope[item] = [m for m in methods if has_key(default_config(m), key)]
        if not scope[item]:
            default_config(methods[0]).set(key, value)  # raises: unknown config key ...
    return scope


def plan_runs(tasks, methods, seeds: int, queries: int, eval_samples: int, overrides, out: str) -> list[RunSpec]:
    """Every (task, method, seed) run with a validated config; raises ConfigError on any bad name or value."""
    from ..training.run_setup import make_task, method_class

    for task in tasks:
        make_task(task_variant(task)[0])
    for method in methods:
        method_class(method)
    specs = []
    for task in tasks:
        name, alpha = task_variant(task)
        for method in methods:
            for seed in range(seeds):
                config = bench_config(method, name, seed, queries, eval_samples, overrides)
                if alpha is not None:
                    config.set("task.alpha", alpha, raw=False)
                if seed == 0:
                    config.trainer.validate()
                    config.method.validate()
                    make_task(name, config.task)
                specs.append(RunSpec(task, method, seed, os.path.join(out, "runs", task, method, f"seed{seed}"),
                                     config.to_dict()))
    return specs


def load_row(spec: RunSpec) -> dict:
    """A finished run's result row: its summary.json, "curve" (from metrics.jsonl), "run_dir", and the spec's task
    label as "task" (TASK@ALPHA for a KL-weight variant; summary.json names the base task)."""
    run_dir = spec.run_dir
    with open(os.path.join(run_dir, "summary.json")) as fh:
        row = json.load(fh)
    eval_rows = []
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as fh:
            eval_rows = [r for r in map(json.loads, filter(str.strip, fh)) if r.get("kind") == "eval"]
    row["curve"] = curve_of(eval_rows)
    row["run_dir"] = run_dir
    row["task"] = spec.task
    return row


def run_one(spec: RunSpec) -> dict:
    """Make one run from scratch (a leftover unfinished directory is removed first) and return its row; any
    exception becomes an error row (its traceback goes to run_dir/error.txt) instead of propagating."""
    try:
        from ..training.run_setup import default_config
        from ..training.trainer import Trainer

        if os.path.isdir(spec.run_dir):
            shutil.rmtree(spec.run_dir)
        config = default_config(spec.method)
        config.update(spec.config)
        Trainer(task_variant(spec.task)[0], spec.method, config, spec.run_dir).train()
        return load_row(spec)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the bench goes on
        os.makedirs(spec.run_dir, exist_ok=True)
        with open(os.path.join(spec.run_dir, "error.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        return error_row(spec, f"{type(exc).__name__}: {exc}")


# ---- the bench -----------------------------------------------------------------------------------------------


@dataclass
class BenchResult:
    rows: list[dict]  # one per run, in (task, method, seed) order
    table: str  # the text of table.md
    written: list[str]  # results.json, table.md and the plots
    failed: list[dict]  # the error rows
    reused: int  # runs taken from an earlier bench in the same folder
    discretization: str = ""  # the text of discretization.md (--discretization), else ""
    discretization_failed: list[dict] = field(default_factory=list)  # evaluations that failed


def command_text(tasks, methods, queries, seeds, out, jobs, eval_samples, overrides, extra=()) -> str:
    """The explicit `sqdf bench ...` command that reproduces a bench (every setting spelled out; extra: more
    arguments, e.g. the --discretization ones)."""
    argv = ["sqdf", "bench", *tasks, "--methods", ",".join(methods), "--queries", str(queries), "--seeds", str(seeds),
            "--eval-samples", str(eval_samples), "--jobs", str(jobs), "--out", out]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join([*argv, *extra])


def run_bench(tasks=None, methods=None, queries: int = DEFAULT_QUERIES, seeds: int = DEFAULT_SEEDS,
              out: str | None = None, jobs: int = DEFAULT_JOBS, eval_samples: int = DEFAULT_EVAL_SAMPLES,
              overrides=(), log=print, discretization=None, discretization_samples: int | None = None,
              alphas=None) -> BenchResult:
    """Run (or reuse) every method on every task for seeds 0..seeds-1 and write results.json, table.md and the
    plots into out. Bad names or values raise ConfigError before anything runs; failed runs become error rows.
    discretization: sampler step counts ('10,20,50,100'): then every finished run is also evaluated under every
    sampler at each count (discretization_study; discretization_samples samples per setting, default 4096).
    alphas: KL weights ('0.1,0.3,1,3'): every task runs at each (task labels TASK@ALPHA)."""
    from ..methods import METHODS
    from . import discretization as disc

    steps = None if discretization is None else disc.parse_steps(discretization)
    if steps is None and discretization_samples is not None:
        raise ConfigError("--discretization-samples applies to --discretization; add e.g. "
                          "--discretization 10,20,50,100")
    disc_samples = disc.DEFAULT_SAMPLES if discretization_samples is None else discretization_samples
    if disc_samples < 1:
        raise ConfigError(f"--discretization-samples {disc_samples} must be >= 1 (e.g. 4096)")
    tasks = split_names(tasks) or list(DEFAULT_TASKS)
    if alphas:
        tasks = with_alphas(tasks, alphas)
    methods = split_names(methods) or [name for name, cls in METHODS.items() if not cls.offline]
    for name, value in (("--queries", queries), ("--seeds", seeds), ("--jobs", jobs), ("--eval-samples", eval_samples)):
        if value < 1:
            raise ConfigError(f"{name} {value} must be >= 1")
    out = out or DEFAULT_OUT.format(timestamp=time.strftime("%Y%m%d-%H%M%S"))
    overrides = list(overrides)
    for item, where in override_scope(methods, overrides).items():
        if len(where) < len(methods):
            log(f"sqdf bench: --set {item} applies only to {', '.join(where)} (the other methods have no such key)")
    specs = plan_runs(tasks, methods, seeds, queries, eval_samples, overrides, out)
    for spec in specs if steps else ():
        if max(steps) >= spec.config["task"]["num_train_steps"]:
            raise ConfigError(f"--discretization {max(steps)} steps: {spec.task} has "
                              f"{spec.config['task']['num_train_steps']} training timesteps; use fewer steps")

    done = [s for s in specs if os.path.exists(os.path.join(s.run_dir, "summary.json"))]
    todo = [s for s in specs if s not in done]
    rows_by_spec = {}
    for spec in done:
        rows_by_spec[spec] = load_row(spec)
        differences = _saved_config_differences(spec)
        if differences:
            log(f"sqdf bench: warning: reused {spec.run_dir} was made with other settings ({'; '.join(differences)});"
                " delete it to run it again")
    workers = max(1, min(jobs, os.cpu_count() or 1, len(todo)))
    log(f"sqdf bench: {len(specs)} runs ({len(tasks)} tasks x {len(methods)} methods x {seeds} seeds) at "
        f"{queries} training reward queries each in {out}; reusing {len(done)} finished, running {len(todo)} "
        f"with {workers} worker(s)")
    if todo:
        rows_by_spec.update(zip(todo, execute(todo, workers, run_one)))
    rows = [rows_by_spec[s] for s in specs]

    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "results.json"), os.path.join(out, "table.md")]
    atomic_write_text(written[0], json.dumps(rows, indent=1))
    extra = () if steps is None else ("--discretization", ",".join(map(str, steps)),
                                      "--discretization-samples", str(disc_samples))
    command = command_text(tasks, methods, queries, seeds, out, jobs, eval_samples, overrides, extra)
    table = header_text(command, queries, seeds, eval_samples, machine_text()) + "\n" + \
        overview_table(rows, tasks, methods) + "\n" + results_tables(rows, tasks, methods)
    atomic_write_text(written[1], table)
    if any("error" not in r for r in rows):
        from ..training.run_setup import make_task

        task_objects = {t: make_task(task_variant(t)[0], _task_config(specs, t)) for t in tasks}
        from .plots import write_plots

        written += write_plots(rows, task_objects, methods, os.path.join(out, "plots"), log)
    failed = [r for r in rows if "error" in r]
    result = BenchResult(rows, table, written, failed, len(done))
    if steps is not None:
        from .discretization_study import run_discretization

        header = f"`{command}`\n\nMachine: {machine_text()}; training: {queries} reward queries per run.\n"
        result.discretization, paths, result.discretization_failed = run_discretization(
            rows, steps, disc.SAMPLERS, disc_samples, out, jobs, tasks, methods, header, log)
        result.written += paths
    return result


def _task_config(specs, task: str):
    """The task section of the first run of a task (presets and --set applied), as a TaskConfig."""
    from ..tasks import TaskConfig

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
