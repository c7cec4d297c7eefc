"""Equal-budget tuning sweeps: run `sqdf train` for a grid of overrides per method and print the outcomes.

    python benchmarks/tune_methods.py --tasks gmm1,gaussian --queries 16384 --jobs 2 --out /tmp/tune \
        --grid 'ddpo:method.lr=3e-4,1e-3;method.clip_range=1e-4,1e-2'

Each --grid item is METHOD:KEY=V1,V2;KEY=V1,V2 (the product of the values is swept). Results are appended to
OUT/tune.jsonl (one row per run: task, method, overrides, seed and the summary's metrics).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

KEYS = ("reward_mean", "path_kl", "regret", "x0_regret", "mode_tv", "reward_queries", "queries_per_sample",
        "wall_seconds")


def parse_grid(item: str) -> tuple[str, list[dict]]:
    method, _, spec = item.partition(":")
    axes = []
    for part in filter(None, spec.split(";")):
        key, _, values = part.partition("=")
        axes.append([(key, v) for v in values.split(",")])
    return method, [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def run_one(task: str, method: str, overrides: dict, seed: int, queries: int, out: str) -> dict:
    tag = "-".join(f"{k.split('.')[-1]}{v}" for k, v in overrides.items()) or "default"
    run_dir = os.path.join(out, task, method, tag, f"seed{seed}")
    summary_path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(summary_path):
        cmd = [sys.executable, "-m", "sqdf.cli", "train", task, "--method", method, "--seed", str(seed),
               "--out", run_dir, "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
               "--set", "trainer.device=cpu", "--set", f"trainer.max_queries={queries}",
               "--set", "trainer.steps=1000000", "--set", "trainer.eval_every=0",
               "--set", "trainer.eval_samples=2048", "--set", "trainer.checkpoint_every=1000000",
               "--set", "trainer.plots=false", "--set", "trainer.floor=false"]
        for key, value in overrides.items():
            cmd += ["--set", f"{key}={value}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"task": task, "method": method, "overrides": overrides, "seed": seed,
                    "error": proc.stderr.strip().splitlines()[-1:]}
    with open(summary_path) as fh:
        summary = json.load(fh)
    return {"task": task, "method": method, "overrides": overrides, "seed": seed,
            **{k: summary.get(k) for k in KEYS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="gmm1,gaussian")
    p.add_argument("--queries", type=int, default=16384)
    p.add_argument("--seeds", default="0")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--grid", action="append", required=True)
    args = p.parse_args()
    jobs = []
    for item in args.grid:
        method, combos = parse_grid(item)
        for task in args.tasks.split(","):
            for overrides in combos:
                for seed in map(int, args.seeds.split(",")):
                    jobs.append((task, method, overrides, seed, args.queries, args.out))
    os.makedirs(args.out, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool, open(os.path.join(args.out, "tune.jsonl"), "a") as log:
        for row in pool.map(lambda j: run_one(*j), jobs):
            log.write(json.dumps(row) + "\n")
            log.flush()
            fmt = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(fmt), flush=True)


if __name__ == "__main__":
    main()
