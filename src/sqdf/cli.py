"""Command line: ``sqdf train``, ``sqdf resume``, ``sqdf tasks``, ``sqdf bench``, ``sqdf sample``, ``sqdf pairs``,
``sqdf reward-model``, ``sqdf blackbox``.

Bad input (unknown task, method or key, out-of-range values, a broken reward, a missing or corrupt checkpoint)
prints one message naming the value and the fix, and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from .errors import SqdfError

DEFAULT_METHOD = "sqdf"
BLACKBOX_METHOD = "sqdf-paper"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sqdf", description="Fine-tune diffusion models toward a reward.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune on a task")
    t.add_argument("task", help="task name (see `sqdf tasks`)")
    t.add_argument("--method", default=DEFAULT_METHOD, help="fine-tuning method (default: sqdf)")
    t.add_argument("--config", help="YAML file with trainer:, method:, task: sections")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set method.gamma=0.95 (repeatable)")
    t.add_argument("--steps", type=int, help="training iterations (trainer.steps)")
    t.add_argument("--seed", type=int, help="random seed (trainer.seed)")
    t.add_argument("--out", help="run directory (default: runs/TASK-METHOD-seedS-TIMESTAMP)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    t.add_argument("--model", help="diffusers tasks: local pipeline folder (task.model)")
    t.add_argument("--reward-weights", help="diffusers tasks: local reward weights, PATH or name=PATH,... "
                   "(task.reward_weights)")
    t.add_argument("--tiny", action="store_true", help="diffusers tasks: random tiny models and a few iterations, "
                   "to check a preset end to end on a CPU")

    r = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    r.add_argument("run_dir", help="the --out directory of a `sqdf train` run")
    r.add_argument("--steps", type=int, help="extend the run to this many iterations")

    sub.add_parser("tasks", help="list the built-in tasks and their known optima")

    s = sub.add_parser("sample", help="draw samples from a fine-tuned run and save a picture")
    s.add_argument("checkpoint", help="run directory (newest checkpoint) or DIR/checkpoints/ckpt_*.pt")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--out", default="samples.png", help="PNG to write (default samples.png); the samples are also "
                   "saved next to it as .safetensors")
    s.add_argument("--cond", help="condition labels, comma-separated and cycled (digits: e.g. 3 or 1,7); "
                   "default: the task's own draw")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--reference", action="store_true", help="sample the frozen base model instead (to compare)")

    q = sub.add_parser("pairs", help="write preference pairs of a task's base model, labelled by Bradley-Terry on "
                       "its reward (for diffusion-dpo: --set method.data=FILE)")
    q.add_argument("task", help="task name (see `sqdf tasks`)")
    q.add_argument("--n", type=int, default=2048, help="number of pairs (default 2048)")
    q.add_argument("--out", default="pairs.jsonl", help=".jsonl or .parquet file to write (default pairs.jsonl)")
    q.add_argument("--temperature", type=float, default=1.0, help="Bradley-Terry label temperature (default 1; "
                   "0: deterministic comparisons)")
    q.add_argument("--seed", type=int, default=0, help="sampling and labelling seed")
    q.add_argument("--scores", action="store_true", help="write N scored samples (columns x, score) instead of "
                   "pairs, for offline dro (--set method.data=FILE)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="task.KEY=VALUE",
                   help="override a task key, e.g. --set task.alpha=0.3 (repeatable)")

    m = sub.add_parser("reward-model", help="fit a Bradley-Terry reward model on preference pairs, for training any "
                       "reward-based method on it (sqdf train --set trainer.reward_model=MODEL)")
    m.add_argument("pairs_file", metavar="PAIRS_FILE", help=".jsonl or .parquet preference pairs (e.g. from `sqdf "
                   "pairs TASK`)")
    m.add_argument("--task", required=True, help="task whose samples the pairs hold; its proxy features are the "
                   "model's input (see `sqdf tasks`)")
    m.add_argument("--out", required=True, metavar="MODEL.safetensors", help="file to write")
    m.add_argument("--ensemble", type=int, default=5, help="MLP heads, each fit on a bootstrap resample (default 5)")
    m.add_argument("--hidden", type=int, default=64, help="MLP width (default 64)")
    m.add_argument("--epochs", type=int, default=300, help="passes over the pairs (default 300)")
    m.add_argument("--temperature", type=float, default=1.0, help="Bradley-Terry label temperature the reward's "
                   "scale is read in (default 1, as `sqdf pairs`)")
    m.add_argument("--holdout", type=float, default=0.1, help="share of pairs held out for the accuracy (default 0.1)")
    m.add_argument("--seed", type=int, default=0, help="seed of the split, init, bootstrap and minibatches")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="task.KEY=VALUE",
                   help="override a task key, e.g. --set task.alpha=0.3 (repeatable)")

    x = sub.add_parser("blackbox", help="online black-box optimization: a query budget on a hidden oracle, a proxy "
                       "refit each round, any method as the inner optimizer")
    x.add_argument("task", nargs="?", help="task name (its reward becomes the hidden oracle)")
    x.add_argument("--budget", type=int, default=1024, help="oracle queries in all (hard limit; default 1024)")
    x.add_argument("--method", default=BLACKBOX_METHOD, help=f"inner fine-tuning method (default: {BLACKBOX_METHOD}, "
                   "the published SQDF, tuned in this loop; the learned-value `sqdf` is not measured here yet)")
    x.add_argument("--proxy", default="ensemble", choices=("ensemble", "ucb"), help="proxy reward model")
    x.add_argument("--rounds", default="1,2,4,8", help="budget shares per round (default 1,2,4,8)")
    x.add_argument("--noise", type=float, default=0.1, help="oracle observation noise std (default 0.1)")
    x.add_argument("--inner-steps", type=int, default=50, help="fine-tuning iterations per round (default 50)")
    x.add_argument("--eval-samples", type=int, default=512, help="samples per true-reward evaluation")
    x.add_argument("--seed", type=int, default=0, help="seed of the run")
    x.add_argument("--out", help="run directory (default: runs/blackbox-TASK-METHOD-seedS-TIMESTAMP)")
    x.add_argument("--resume", metavar="DIR", help="continue a killed run (no label is bought twice)")
    x.add_argument("--direct", action="store_true", help="baseline: train the method on the oracle itself (no proxy, "
                   "no rounds), evaluating the true reward 8 times over the budget")
    x.add_argument("--best-of", type=int, metavar="N", help="baseline: best-of-N selection by the oracle's labels "
                   "(the budget buys budget/N outputs of the base model; evaluated after each round)")
    x.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the inner run's config, e.g. --set method.lr=1e-4 (repeatable)")

    from .bench import runs as bench

    b = sub.add_parser("bench", help="compare methods on tasks over seeds at the same training reward-query budget")
    b.add_argument("tasks", nargs="*", metavar="TASK",
                   help=f"tasks, space- or comma-separated (default: {' '.join(bench.DEFAULT_TASKS)})")
    b.add_argument("--methods", help="comma-separated methods (default: every registered method but the offline "
                   "ones, diffusion-dpo)")
    b.add_argument("--queries", type=int, default=bench.DEFAULT_QUERIES,
                   help=f"training reward queries per run (default: {bench.DEFAULT_QUERIES})")
    b.add_argument("--seeds", type=int,
                   help=f"seeds 0..K-1 per task and method (default: {bench.DEFAULT_SEEDS}; --preferences: 1)")
    b.add_argument("--out", help="output folder (default: runs/bench-TIMESTAMP); re-run to finish an interrupted bench")
    b.add_argument("--jobs", type=int, default=bench.DEFAULT_JOBS,
                   help=f"parallel runs, capped to the CPU count (default: {bench.DEFAULT_JOBS}; 1: in-process)")
    b.add_argument("--eval-samples", type=int,
                   help=f"samples per evaluation (default: {bench.DEFAULT_EVAL_SAMPLES}; --blackbox: 512)")
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key in every run whose method has it, e.g. --set "
                   "task.num_inference_steps=50 (repeatable)")
    b.add_argument("--discretization", metavar="T1,T2,...", help="after the runs, evaluate every fine-tuned network "
                   "with the DDPM, Euler-Maruyama, Heun and probability-flow ODE samplers at these step counts, e.g. "
                   "10,20,50,100 (writes discretization.md/.json and plots/discretization_TASK.png; train every method "
                   "at one count with --set task.num_inference_steps=T)")
    b.add_argument("--discretization-samples", type=int, metavar="N",
                   help="--discretization: samples per sampler setting (default 4096)")
    b.add_argument("--alphas", metavar="A1,A2,...", help="run every task at each of these KL weights (task labels "
                   "TASK@ALPHA, e.g. --alphas 0.1,0.3,1,3; a single variant is also a task name: gmm1@0.3); tasks "
                   "whose optimum is known for one alpha only (mix25to9, digits) refuse")
    b.add_argument("--blackbox", type=int, metavar="BUDGET", help="compare in the black-box setting at this oracle "
                   "budget per run; --methods then takes entries METHOD (proxy loop), METHOD:direct (trained on the "
                   "oracle) and best_of_n:N (default: sqdf,ddpo:direct,prdp:direct,best_of_n:8; tasks default gmm1)")
    b.add_argument("--rounds", help="--blackbox: budget shares per round (default 1,2,4,8)")
    b.add_argument("--inner-steps", type=int, help="--blackbox: proxy-loop iterations per round (default: the "
                   "task's black-box preset, else 50)")
    b.add_argument("--noise", type=float, help="--blackbox: oracle observation noise std (default 0.1)")
    b.add_argument("--preferences", metavar="L1,L2,...", help="preference mode: every preference method, and "
                   "METHOD+rm (a reward-based method on a reward model fit on the same labels), at each of these "
                   "numbers of Bradley-Terry labels, e.g. 256,1024,4096 (tasks default gmm1 mix25to9 gaussian; "
                   "methods default d3po,dense-dpo,dro,diffusion-dpo,inpo,sqdf+rm,ddpo+rm; --queries caps the "
                   "learned-reward queries of METHOD+rm; seeds default 1)")
    b.add_argument("--offline-steps", type=int, metavar="N", help="--preferences: gradient steps of the offline "
                   "methods (default 200)")
    return p


def _print_config_help(run_config) -> None:
    for section, cfg in run_config.sections().items():
        print(f"[{section}]")
        for f in dataclasses.fields(cfg):
            print(f"  {section}.{f.name} = {getattr(cfg, f.name)!r}\n      {f.metadata.get('help', '')}")


def _train(args) -> int:
    from .config import load_yaml, parse_assignment
    from .training.run_setup import check_task_name, default_config, make_task, method_class
    from .training.trainer import Trainer

    method_class(args.method)
    check_task_name(args.task)
    run_config = default_config(args.method, args.task)
    from .tasks import SD_TASKS, tiny_overrides

    sd_flags = {"--model": args.model, "--reward-weights": args.reward_weights, "--tiny": args.tiny or None}
    used = [flag for flag, value in sd_flags.items() if value is not None]
    if used and args.task not in SD_TASKS:
        raise SqdfError(f"{', '.join(used)} apply to the diffusers tasks ({', '.join(SD_TASKS)}), not to {args.task}")
    if args.tiny:
        run_config.update(tiny_overrides(args.method))
    if args.help_config:
        _print_config_help(run_config)
        return 0
    if args.config:
        run_config.update(load_yaml(args.config))
    for item in args.overrides:
        key, value = parse_assignment(item)
        run_config.set(key, value)
    if args.steps is not None:
        run_config.set("trainer.steps", args.steps)
    if args.seed is not None:
        run_config.set("trainer.seed", args.seed)
    if args.model is not None:
        run_config.set("task.model", args.model, raw=False)
    if args.reward_weights is not None:
        run_config.set("task.reward_weights", args.reward_weights, raw=False)
    if args.task not in SD_TASKS:  # cheap to build: fail fast on a bad option (diffusers tasks fail in Trainer)
        make_task(args.task, run_config.task)
    out = args.out or os.path.join(
        "runs", f"{args.task}-{args.method}-seed{run_config.trainer.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if os.path.exists(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise SqdfError(f"--out {out!r} already holds a run with checkpoints; use `sqdf resume {out}` "
                        "or choose another --out")
    trainer = Trainer(args.task, args.method, run_config, out)
    summary = trainer.train()
    _report(summary, out)
    return 0


def _task_settings(overrides, command: str) -> dict:
    """{task.KEY: value} from --set items of a command that takes task keys only."""
    from .config import parse_assignment

    settings = {}
    for item in overrides:
        key, value = parse_assignment(item)
        if not key.startswith("task."):
            raise SqdfError(f"--set {item!r}: `{command}` takes task keys only (task.KEY=VALUE)")
        settings[key] = value
    return settings


def _pairs(args) -> int:
    from .training.preference_pairs import write_reference_pairs

    settings = _task_settings(args.overrides, "sqdf pairs")
    if args.n < 1:
        raise SqdfError(f"--n {args.n} must be >= 1")
    if args.temperature < 0:
        raise SqdfError(f"--temperature {args.temperature} must be >= 0")
    if args.scores:
        from .preferences.data import write_scores
        from .training.preference_pairs import reference_scores

        path = write_scores(reference_scores(args.task, args.n, args.seed, settings), args.out)
        print(f"wrote {args.n} scored samples of {args.task}'s base model to {path}")
        return 0
    path = write_reference_pairs(args.task, args.n, args.out, args.temperature, args.seed, settings)
    print(f"wrote {args.n} preference pairs of {args.task}'s base model to {path}")
    return 0


def _reward_model(args) -> int:
    from .training.learned_reward import fit_reward_model

    settings = _task_settings(args.overrides, "sqdf reward-model")
    if not args.out.endswith(".safetensors"):
        raise SqdfError(f"--out {args.out!r}: the reward model is a safetensors file; name it MODEL.safetensors")
    if not 0 <= args.holdout < 1:
        raise SqdfError(f"--holdout {args.holdout} must be in [0, 1)")
    fit_reward_model(args.task, args.pairs_file, args.out, ensemble=args.ensemble, hidden=args.hidden,
                     epochs=args.epochs, seed=args.seed, temperature=args.temperature, holdout=args.holdout,
                     settings=settings, log=print)
    print(f"train on it: sqdf train {args.task} --method ddpo --set trainer.reward_model={args.out}")
    return 0


def _resume(args) -> int:
    from .training.trainer import Trainer

    trainer = Trainer.resume(args.run_dir)
    if args.steps is not None:
        if args.steps < trainer.iteration:
            raise SqdfError(f"--steps {args.steps} is below the {trainer.iteration} iterations already done")
        trainer.config.set("trainer.steps", args.steps)
        trainer.write_config()
    summary = trainer.train()
    _report(summary, args.run_dir)
    return 0


def _report(summary: dict, out: str) -> None:
    keys = ("task", "method", "seed", "reward_mean", "learned_reward", "path_kl", "objective", "optimum", "regret",
            "mode_tv", "energy_distance", "target_accuracy", "frechet", "diversity", "optimal_frechet",
            "optimal_diversity", "reward_queries", "wall_seconds")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
    if "floor" in summary:
        print(f"exact-score sampling floor at {summary['num_inference_steps']} steps: "
              f"regret {summary['floor']['regret']:.4f}")
    print(f"run directory: {out}  (summary.json, metrics.jsonl, plots/, checkpoints/)")


def _tasks(_args) -> int:
    from .tasks import SD_TASKS, TASKS, default_task_config

    print(f"{'task':<20} {'alpha':>5} {'J*':>9} {'E*[r]':>9} {'KL*':>7}  description")
    for name, factory in TASKS.items():
        if name in SD_TASKS:  # needs a pipeline (--model DIR or --tiny); no known optimum
            print(f"{name:<20} {'-':>5} {'-':>9} {'-':>9} {'-':>7}  {SD_TASKS[name][2]} (--model DIR or --tiny)")
            continue
        task = factory(default_task_config(name))
        opt = task.known_optimum()
        print(f"{name:<20} {task.alpha:>5.2f} {opt.optimum:>9.4f} {opt.reward_mean:>9.4f} {opt.kl:>7.4f}  "
              f"{task.description}")
    return 0


def _sample(args) -> int:
    from safetensors.torch import save_file

    from .training.saved_runs import load_run, sample_run

    if args.n < 1:
        raise SqdfError(f"--n {args.n} must be >= 1")
    run = load_run(args.checkpoint)
    samples, cond, rewards = sample_run(run, args.n, args.seed, args.cond, args.reference)
    who = "reference (base) model" if args.reference else f"{run.method_name} at iteration {run.iteration}"
    title = f"{run.task_name}: {who}, mean reward {float(rewards.mean()):.3f}"
    if len(run.task.sample_shape) == 3 and not hasattr(run.task, "decode"):  # digits; latents are decoded by plot
        from .digits.pictures import save_grid

        save_grid(samples, args.out, ncol=min(8, args.n), title=title)
    else:
        run.task.plot(samples, args.out, title, cond=cond)
    tensors = {"samples": samples.detach().float().cpu().contiguous(), "rewards": rewards.detach().float().cpu()}
    if cond is not None:
        tensors["cond"] = cond.detach().cpu().contiguous()
    stem = os.path.splitext(args.out)[0]
    save_file(tensors, f"{stem}.safetensors")
    print(f"{title}\nwrote {args.out} and {stem}.safetensors")
    return 0


def _blackbox(args) -> int:
    from .blackbox.baselines import BestOfNRun, DirectRun
    from .blackbox.loop import BlackboxRun
    from .blackbox.resume import resume_run
    from .blackbox.run_folder import BlackboxConfig

    if args.resume:
        run = resume_run(args.resume)
        out = args.resume
    else:
        if not args.task:
            raise SqdfError("name a task (e.g. `sqdf blackbox gmm1 --budget 512`) or pass --resume DIR")
        from .config import parse_assignment
        from .training.run_setup import check_task_name, default_config, method_class

        if args.best_of is not None and args.direct:
            raise SqdfError("--best-of and --direct are two different baselines; pass one of them")
        method = "best_of_n" if args.best_of is not None else args.method
        method_class(method)
        check_task_name(args.task)
        run_config = default_config(method, args.task)
        run_config.update({"trainer": {"seed": args.seed, "eval_every": 0, "eval_samples": 64, "plots": False,
                                       "checkpoint_every": 10**9, "progress": False}})
        for item in args.overrides:
            run_config.set(*parse_assignment(item))
        bb = BlackboxConfig(budget=args.budget, round_shares=args.rounds, noise_std=args.noise, proxy=args.proxy,
                            inner_steps=args.inner_steps, eval_samples=args.eval_samples, seed=args.seed)
        kind = f"best-of-{args.best_of}" if args.best_of is not None else args.method
        out = args.out or os.path.join("runs", f"blackbox-{args.task}-{kind}-seed{args.seed}-"
                                       f"{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.exists(os.path.join(out, "blackbox.yaml")):
            raise SqdfError(f"--out {out!r} already holds a black-box run; continue it with --resume {out}")
        if args.best_of is not None:
            run = BestOfNRun(args.task, run_config, bb, out, args.best_of)
        else:
            run = (DirectRun if args.direct else BlackboxRun)(args.task, args.method, run_config, bb, out)
    rows = run.run()
    print(f"{'round':>5} {'queries':>8} {'true reward':>12} {'path KL':>8} {'regret':>8}")
    for r in rows:
        regret = "-" if r.get("regret") is None else f"{r['regret']:.4f}"
        print(f"{r['round']:>5} {r['queries']:>8} {r['reward_mean']:>12.4f} {r['path_kl']:>8.3f} {regret:>8}")
    print(f"run directory: {out}  (blackbox.jsonl, oracle/, inner/, checkpoints/)")
    return 0


def _bench(args) -> int:
    from .bench import runs as bench
    from .bench.runs import run_bench

    if args.blackbox is not None and (args.discretization or args.discretization_samples):
        raise SqdfError("--discretization evaluates the runs of an ordinary bench; drop it or --blackbox")
    if args.blackbox is not None and args.alphas:
        raise SqdfError("--alphas applies to the ordinary bench; drop it or --blackbox")
    if args.preferences is not None and (args.blackbox is not None or args.alphas or args.discretization):
        raise SqdfError("--preferences is a bench of its own; drop --blackbox, --alphas and --discretization")
    if args.offline_steps is not None and args.preferences is None:
        raise SqdfError("--offline-steps applies to --preferences; add e.g. --preferences 256,1024,4096")
    seeds = bench.DEFAULT_SEEDS if args.seeds is None else args.seeds
    try:
        if args.preferences is not None:
            from .bench import preference_bench as pb

            result = pb.run_preference_bench(
                args.tasks, [args.methods] if args.methods else None, args.preferences,
                1 if args.seeds is None else args.seeds, args.queries, args.offline_steps or pb.DEFAULT_OFFLINE_STEPS,
                args.out, args.jobs, args.eval_samples or bench.DEFAULT_EVAL_SAMPLES, args.overrides)
        elif args.blackbox is not None:
            from .bench.blackbox import run_blackbox_bench

            eval_samples = args.eval_samples or 512
            result = run_blackbox_bench(args.tasks, [args.methods] if args.methods else None, args.blackbox,
                                        seeds, args.out, args.jobs, eval_samples, args.overrides,
                                        {"round_shares": args.rounds, "inner_steps": args.inner_steps,
                                         "noise_std": args.noise})
        else:
            result = run_bench(args.tasks, [args.methods] if args.methods else None, args.queries, seeds,
                               args.out, args.jobs, args.eval_samples or bench.DEFAULT_EVAL_SAMPLES, args.overrides,
                               discretization=args.discretization,
                               discretization_samples=args.discretization_samples, alphas=args.alphas)
    except KeyboardInterrupt:
        print("sqdf: interrupted; finished runs are kept: run the same command again to finish the bench",
              file=sys.stderr)
        return 130
    print()
    print(result.table)
    if getattr(result, "discretization", ""):
        print(result.discretization)
    print("written:")
    for path in result.written:
        print(f"  {path}")
    if result.failed:
        print(f"sqdf bench: {len(result.failed)} of {len(result.rows)} runs failed (error.txt in each run directory):",
              file=sys.stderr)
        for row in result.failed:
            print(f"  {row['task']}/{row['method']}/seed{row['seed']}: {row['error']}", file=sys.stderr)
        return 1
    if getattr(result, "discretization_failed", None):
        print(f"sqdf bench: {len(result.discretization_failed)} discretization evaluations failed (see "
              "discretization.json)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"train": _train, "resume": _resume, "tasks": _tasks, "bench": _bench, "sample": _sample,
                "blackbox": _blackbox, "pairs": _pairs, "reward-model": _reward_model}
    try:
        return handlers[args.command](args)
    except SqdfError as exc:
        print(f"sqdf: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sqdf: interrupted; the newest finished checkpoint is intact (resume with `sqdf resume DIR`)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
