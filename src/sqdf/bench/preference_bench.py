"""``sqdf bench --preferences L1,L2,..``: preference methods and reward models learned from the same labels, at
equal numbers of preference labels, scored against the task's known optimum.

Every label is a Bradley-Terry comparison of the task reward at temperature 1, so with the DPO weight alpha every
method here aims at the same tilted target p* = p_ref exp(r / alpha) / Z as the reward-based bench
(PREFERENCES.md 10.1-10.2), and regret is defined for all of them. At a budget of L labels:

* online pairwise methods (``d3po``, ``dense-dpo``) buy their labels on their own samples: L labels are 2 L
  reward queries (each label compares two scored samples), ``trainer.max_queries = 2 L``;
* offline methods (``diffusion-dpo``, ``inpo``) read L labelled pairs of base-model samples from a file (the
  same file for every offline method and for the reward model, per task, budget and seed), for ``--offline-steps``
  gradient steps;
* ``METHOD+rm`` (e.g. ``sqdf+rm``, ``ddpo+rm``) trains the reward-based METHOD on a Bradley-Terry reward model
  fit on those L pairs (``trainer.reward_model``): it never sees the true reward, queries to the learned model are
  free and capped at ``--queries``; evaluation scores the true reward, so over-optimization of the model shows;
* any other reward-based method (and ``dro``, which needs pointwise scores) gets L true reward queries: one
  pointwise score per label, more information than one comparison, said in the table header.

Layout of DIR: data/TASK/L{L}/seed{S}/ (pairs.parquet, reward_model.safetensors), runs/TASK/L{L}/METHOD/seed{S}/
(ordinary run directories), results.json, table.md, plots/{regret,diversity}_vs_labels_TASK.png. Finished runs
and data are reused when the command is run again.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..training.checkpoint import atomic_write_text
from .pool import execute, machine_text
from .tables import MISSING, best_indices, format_stat, split_names, summarize, task_table

DEFAULT_TASKS = ("gmm1", "mix25to9", "gaussian")
DEFAULT_LABELS = (256, 1024, 4096)
DEFAULT_METHODS = ("d3po", "dense-dpo", "dro", "diffusion-dpo", "inpo", "sqdf+rm", "ddpo+rm")
ONLINE_PAIRWISE = ("d3po", "dense-dpo")  # each label costs the two reward queries of the compared samples
DEFAULT_OFFLINE_STEPS = 200
LEARNED = "+rm"
# Offline methods' code-unit temperature is set for SD's d = 16,384 per-element mean errors (5000, 2000); the
# mean over a toy's d <= 8 elements needs a temperature about d / 16,384 as large for the same per-sample weight,
# and the offline loss here sees 1024 pairs a step (the file is resampled with replacement).
_VECTOR_OFFLINE = {"method": {"beta": 5.0, "lr": 1e-3, "pairs_per_step": 1024}}
# The online methods' learning rates on the vector tasks: the better of the two tried for each on gmm1 at 16,384
# queries, seed 0 (BENCHMARKS.md, "Preference methods"); the method defaults (1e-4) are set for SD-size LoRA.
_VECTOR_ONLINE = {"d3po": {"method": {"lr": 3e-3}}, "dense-dpo": {"method": {"lr": 3e-3}},
                  "dro": {"method": {"lr": 3e-4}}}


@dataclass(frozen=True)
class PrefSpec:
    """One run of the preference bench. ``method`` is the table label (``ddpo+rm``), ``base`` the method run."""

    task: str
    method: str
    base: str
    labels: int
    seed: int
    run_dir: str
    data_dir: str
    config: dict = field(compare=False)

    @property
    def label(self) -> str:
        return f"{self.task}/L{self.labels}/{self.method}/seed{self.seed}"


def parse_labels(text) -> list[int]:
    """'256,1024,4096' (or a list) -> sorted distinct label budgets; each must be an integer >= 2."""
    items = split_names([text]) if isinstance(text, str) else [str(v) for v in text]
    out = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            value = 0
        if value < 2:
            raise ConfigError(f"--preferences {item!r}: label budgets must be integers >= 2, e.g. 256,1024,4096")
        out.append(value)
    if not out:
        raise ConfigError("--preferences needs label budgets, e.g. --preferences 256,1024,4096")
    return sorted(set(out))


def base_method(label: str) -> str:
    """The method a table label runs: 'sqdf+rm' -> 'sqdf'."""
    return label[: -len(LEARNED)] if label.endswith(LEARNED) else label


def budget_settings(label: str, labels: int, queries: int, offline_steps: int, data_dir: str) -> dict:
    """The trainer/method settings that give ``label`` a budget of ``labels`` preference labels."""
    from ..methods import METHODS

    base = base_method(label)
    cls = METHODS[base]
    evals = 4
    if label.endswith(LEARNED):
        if cls.offline or base in ONLINE_PAIRWISE or not cls.trains:
            raise ConfigError(f"{label!r}: '+rm' trains a reward-based method on the learned reward model; "
                              f"{base} is not one (use e.g. sqdf+rm, ddpo+rm, prdp+rm)")
        return {"trainer.reward_model": os.path.join(data_dir, "reward_model.safetensors"),
                "trainer.max_queries": queries, "trainer.eval_every_queries": max(1, queries // evals)}
    if cls.offline:
        return {"method.data": os.path.join(data_dir, "pairs.parquet"), "trainer.steps": offline_steps,
                "trainer.max_queries": 0, "trainer.eval_every": max(1, offline_steps // evals)}
    if not cls.trains:
        raise ConfigError(f"{label!r} is an inference-time method; the preference bench compares trained ones")
    q = 2 * labels if base in ONLINE_PAIRWISE else labels
    return {"trainer.max_queries": q, "trainer.eval_every_queries": max(1, q // evals)}


def plan(tasks, methods, labels, seeds: int, queries: int, offline_steps: int, eval_samples: int, overrides,
         out: str) -> list[PrefSpec]:
    """Every (task, labels, method, seed) run with a validated config; raises ConfigError on bad names/values."""
    from ..config import parse_assignment
    from ..methods import METHODS
    from ..tasks import bench_presets
    from ..training.run_setup import default_config, make_task
    from .runs import STEP_CAP, has_key

    for task in tasks:
        make_task(task)
    for label in methods:
        if base_method(label) not in METHODS:
            raise ConfigError(f"unknown method {base_method(label)!r} in --methods {label!r}; known: "
                              f"{', '.join(METHODS)} (append '+rm' to train one on the learned reward model)")
    specs = []
    for task in tasks:
        vector = len(make_task(task).sample_shape) == 1
        for n in labels:
            for label in methods:
                base = base_method(label)
                for seed in range(seeds):
                    data_dir = os.path.join(out, "data", task, f"L{n}", f"seed{seed}")
                    config = default_config(base, task)
                    config.update(bench_presets(task, base))
                    if vector and METHODS[base].offline:
                        config.update(_VECTOR_OFFLINE)
                    if vector and not label.endswith(LEARNED):
                        config.update(_VECTOR_ONLINE.get(base, {}))
                    settings = {"seed": seed, "steps": STEP_CAP, "eval_every": 0, "eval_samples": eval_samples,
                                "checkpoint_every": STEP_CAP, "tensorboard": False, "progress": False,
                                "device": "cpu"}
                    for key, value in settings.items():
                        config.set(f"trainer.{key}", value, raw=False)
                    for key, value in budget_settings(label, n, queries, offline_steps, data_dir).items():
                        config.set(key, value, raw=False)
                    for item in overrides:
                        key, value = parse_assignment(item)
                        if has_key(config, key):
                            config.set(key, value)
                    if seed == 0:
                        config.trainer.validate()
                        if not METHODS[base].offline:  # offline configs need their data file, made later
                            config.method.validate()
                    run_dir = os.path.join(out, "runs", task, f"L{n}", label, f"seed{seed}")
                    specs.append(PrefSpec(task, label, base, n, seed, run_dir, data_dir, config.to_dict()))
    return specs


# ---- data: one pair file and one reward model per (task, labels, seed) ------------------------------------------


def prepare_data(task: str, labels: int, seed: int, data_dir: str, fit_model: bool, log=print) -> None:
    """Write data_dir/pairs.parquet (``labels`` Bradley-Terry pairs of base samples at temperature 1, seed
    1000 + seed) and, when ``fit_model``, data_dir/reward_model.safetensors fit on them. Existing files are kept."""
    from ..preferences.data import load_pairs, write_pairs
    from ..training.preference_pairs import reference_pairs

    pairs_path = os.path.join(data_dir, "pairs.parquet")
    model_path = os.path.join(data_dir, "reward_model.safetensors")
    os.makedirs(data_dir, exist_ok=True)
    if not os.path.exists(pairs_path):
        write_pairs(reference_pairs(task, labels, temperature=1.0, seed=1000 + seed), pairs_path)
    if fit_model and not os.path.exists(model_path):
        from ..training.learned_reward import fit_reward_model

        pairs = load_pairs(pairs_path)
        fit_reward_model(task, pairs, model_path, seed=seed, log=log)


def _as_run_spec(spec: PrefSpec):
    from .runs import RunSpec

    return RunSpec(spec.task, spec.base, spec.seed, spec.run_dir, spec.config)


def _labelled(row: dict, spec: PrefSpec) -> dict:
    """A run's row under the bench's label of its method, with its label budget."""
    row.update(method=spec.method, labels=spec.labels, seed=spec.seed)
    return row


def run_pref_one(spec: PrefSpec) -> dict:
    """Make one run from scratch (``runs.run_one``: failures become error rows) and return its labelled row."""
    from .runs import run_one

    return _labelled(run_one(_as_run_spec(spec)), spec)


# ---- tables and plots (pure but for matplotlib) ---------------------------------------------------------------


def diversity_key(rows) -> str | None:
    """The diversity column the task's rows report: 'diversity' (images) or 'spread_ratio' (vectors)."""
    for key in ("diversity", "spread_ratio"):
        if any(r.get(key) is not None for r in rows if "error" not in r):
            return key
    return None


def labels_table(task: str, rows, methods, labels, key: str, fmt: str, goal: str | None, title: str) -> str:
    """A markdown table of one task: a row per method, a column per label budget, mean ± sd of ``key``."""
    lines = [f"{title}", "", "| method | " + " | ".join(f"{n} labels" for n in labels) + " |",
             "| --- |" + " ---: |" * len(labels)]
    stats = {m: [summarize(r.get(key) for r in rows if r["method"] == m and r.get("labels") == n
                           and "error" not in r) for n in labels] for m in methods}
    best = [best_indices([None if stats[m][j] is None else stats[m][j].mean for m in methods], goal)
            for j in range(len(labels))]
    for i, m in enumerate(methods):
        cells = []
        for j in range(len(labels)):
            text = format_stat(stats[m][j], fmt)
            text = f"**{text}**" if i in best[j] else text
            failed = sum(1 for r in rows if r["method"] == m and r.get("labels") == labels[j] and "error" in r)
            cells.append(text if not failed else f"{text} ({failed} failed)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def preference_tables(rows, tasks, methods, labels) -> str:
    """Per task: regret against labels, diversity against labels, then the full table of each budget."""
    parts = []
    for task in tasks:
        task_rows = [r for r in rows if r.get("task") == task]
        if not task_rows:
            continue
        optimum = next((r.get("optimum") for r in task_rows if r.get("optimum") is not None), None)
        head = f"### {task} (J* = {MISSING if optimum is None else f'{optimum:.4f}'})"
        parts.append(head + "\n\n" + labels_table(task, task_rows, methods, labels, "regret", ".3f", "min",
                                                  "Regret J* - J (true reward), lower is better:"))
        key = diversity_key(task_rows)
        if key is not None:
            what = "spread ratio (sample spread / p*'s; 1 is right)" if key == "spread_ratio" else \
                "diversity (mean pairwise feature distance)"
            parts.append(labels_table(task, task_rows, methods, labels, key, ".3f", None, f"{what}:"))
        for n in labels:
            by_method = {}
            for r in task_rows:
                if r.get("labels") == n:
                    by_method.setdefault(r["method"], []).append(r)
            parts.append(task_table(f"{task}, {n} labels", by_method, methods))
    return "\n".join(parts)


def plot_against_labels(task: str, rows, methods, labels, key: str, ylabel: str, path: str) -> None:
    """Mean ± sd of ``key`` against label budgets (log x), one line per method."""
    from ..evaluation.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, m in enumerate(methods):
        xs, ys, es = [], [], []
        for n in labels:
            s = summarize(r.get(key) for r in rows if r["method"] == m and r.get("labels") == n and "error" not in r)
            if s is not None:
                xs.append(n)
                ys.append(s.mean)
                es.append(s.sd or 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=f"C{k % 10}", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("preference labels")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{task}: {ylabel} against preference labels", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the bench -----------------------------------------------------------------------------------------------


@dataclass
class PreferenceBenchResult:
    rows: list[dict]
    table: str
    written: list[str]
    failed: list[dict]
    reused: int


def command_text(tasks, methods, labels, seeds, queries, offline_steps, eval_samples, jobs, out, overrides) -> str:
    argv = ["sqdf", "bench", *tasks, "--preferences", ",".join(map(str, labels)), "--methods", ",".join(methods),
            "--seeds", str(seeds), "--queries", str(queries), "--offline-steps", str(offline_steps),
            "--eval-samples", str(eval_samples), "--jobs", str(jobs), "--out", out]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def run_preference_bench(tasks=None, methods=None, labels=DEFAULT_LABELS, seeds: int = 1, queries: int = 16384,
                         offline_steps: int = DEFAULT_OFFLINE_STEPS, out: str | None = None, jobs: int = 2,
                         eval_samples: int = 2048, overrides=(), log=print) -> PreferenceBenchResult:
    """Make (or reuse) the data and runs of the preference bench and write results.json, table.md and plots."""
    tasks = split_names(tasks) or list(DEFAULT_TASKS)
    methods = split_names(methods) or list(DEFAULT_METHODS)
    labels = parse_labels(labels)
    for name, value in (("--queries", queries), ("--seeds", seeds), ("--jobs", jobs),
                        ("--eval-samples", eval_samples), ("--offline-steps", offline_steps)):
        if value < 1:
            raise ConfigError(f"{name} {value} must be >= 1")
    for task in tasks:
        if "@" in task:
            raise ConfigError(f"bench task {task!r}: the preference bench runs each task at its own alpha (labels "
                              "at temperature 1 target p_ref exp(r / alpha)); drop the '@'")
    out = out or f"runs/bench-preferences-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = list(overrides)
    specs = plan(tasks, methods, labels, seeds, queries, offline_steps, eval_samples, overrides, out)

    needs_model = {s.data_dir for s in specs if s.method.endswith(LEARNED)}
    for data_dir in dict.fromkeys(s.data_dir for s in specs):
        spec = next(s for s in specs if s.data_dir == data_dir)
        prepare_data(spec.task, spec.labels, spec.seed, data_dir, data_dir in needs_model, log)

    done = [s for s in specs if os.path.exists(os.path.join(s.run_dir, "summary.json"))]
    todo = [s for s in specs if s not in done]
    rows_by_spec = {}
    from .runs import load_row

    for spec in done:
        rows_by_spec[spec] = _labelled(load_row(_as_run_spec(spec)), spec)
    workers = max(1, min(jobs, os.cpu_count() or 1, len(todo) or 1))
    log(f"sqdf bench --preferences: {len(specs)} runs ({len(tasks)} tasks x {len(labels)} label budgets x "
        f"{len(methods)} methods x {seeds} seeds) in {out}; reusing {len(done)}, running {len(todo)} with "
        f"{workers} worker(s)")
    if todo:
        rows_by_spec.update(zip(todo, execute(todo, workers, run_pref_one)))
    rows = [rows_by_spec[s] for s in specs]

    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "results.json"), os.path.join(out, "table.md")]
    atomic_write_text(written[0], json.dumps(rows, indent=1))
    command = command_text(tasks, methods, labels, seeds, queries, offline_steps, eval_samples, jobs, out, overrides)
    header = (f"`{command}`\n\nLabels: Bradley-Terry comparisons of the true reward at temperature 1; online "
              "pairwise methods spend 2 reward queries per label, offline ones read that many pairs of base samples "
              f"({offline_steps} steps), METHOD+rm trains on a reward model fit on those pairs ({queries} learned-"
              "reward queries), other reward-based methods and dro get that many true pointwise scores. Seeds "
              f"0..{seeds - 1}; {eval_samples} evaluation samples; machine: {machine_text()}. Cells: mean ± sd.\n")
    table = header + "\n" + preference_tables(rows, tasks, methods, labels)
    atomic_write_text(written[1], table)
    for task in tasks:
        task_rows = [r for r in rows if r.get("task") == task and "error" not in r]
        if not task_rows:
            continue
        jobs_ = [("regret", "regret J* - J", f"regret_vs_labels_{task}.png")]
        key = diversity_key(task_rows)
        if key is not None:
            jobs_.append((key, key.replace("_", " "), f"diversity_vs_labels_{task}.png"))
        for key_, ylabel, name in jobs_:
            path = os.path.join(out, "plots", name)
            try:
                plot_against_labels(task, task_rows, methods, labels, key_, ylabel, path)
                written.append(path)
            except Exception as exc:  # noqa: BLE001 - the table is worth more than a plot
                log(f"sqdf bench: warning: {name} failed ({type(exc).__name__}: {exc})")
    failed = [r for r in rows if "error" in r]
    return PreferenceBenchResult(rows, table, written, failed, len(done))
