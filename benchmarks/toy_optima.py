"""Run a method on the known-optimum toy tasks for several seeds and print a markdown table.

    python benchmarks/toy_optima.py --tasks gmm1,gaussian --seeds 0,1 --out runs/bench [--set method.gamma=0.97]

Each run is exactly `sqdf train TASK --seed S --out OUT/TASK-sS [--set ...]` (the task's presets apply), so any
row can be reproduced alone. The table shows mean +- standard error of the evaluation estimates per run, the
exact-score floor at the same step count, reward queries and wall seconds on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform

from run_cache import train_or_load


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", default="gmm1,gaussian")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--method", default="sqdf")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    rows = []
    for task in args.tasks.split(","):
        for seed in args.seeds.split(","):
            out = os.path.join(args.out, f"{task}-{args.method}-s{seed}")
            rows.append(train_or_load(["train", task, "--method", args.method, "--seed", seed], out, args.overrides))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}\n")
    print("| task | seed | E[r] | path KL | J | J* | regret | floor regret | mode TV | energy dist | queries | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        floor = r.get("floor", {}).get("regret", float("nan"))
        print(f"| {r['task']} | {r['seed']} | {r['reward_mean']:.3f} ± {r['reward_stderr']:.3f} | "
              f"{r['path_kl']:.3f} ± {r['path_kl_stderr']:.3f} | {r['objective']:.3f} | {r['optimum']:.3f} | "
              f"{r['regret']:.3f} ± {r['objective_stderr']:.3f} | {floor:.3f} | {r.get('mode_tv', float('nan')):.3f} | "
              f"{r['energy_distance']:.4f} | {r['reward_queries']} | {r['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
