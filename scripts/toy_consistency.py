"""Distill (or load from the cache) the toy tasks' consistency models and measure them against a fine ODE solve.

    OMP_NUM_THREADS=1 python scripts/toy_consistency.py [--tasks gmm1,gmm2,mix25to9,gaussian] [--steps 3000]

Prints one JSON line per task: distillation (or load) seconds, and per timestep t the root mean squared error per
dimension of f(x_t, t) and of the 64-step Heun targets, both against a 512-step Heun solve, over x_t drawn from the
forward process.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from sqdf.models import toy_consistency as tc
from sqdf.tasks import TASKS, default_task_config

TIMES = [999, 750, 500, 250, 100, 10]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="gmm1,gmm2,mix25to9,gaussian")
    parser.add_argument("--steps", type=int, default=tc.DEFAULT_STEPS, help="distillation steps")
    parser.add_argument("--n", type=int, default=2048, help="states per timestep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.tasks.split(","):
        task = TASKS[name](default_task_config(name))
        start = time.time()
        model = task.consistency_model(steps=args.steps)
        seconds = time.time() - start
        abar = task.make_schedule().alphas_cumprod
        model_mse = tc.consistency_mse(model, task.base, abar, TIMES, n=args.n)
        target_mse = tc.ode_error(task.base, abar, TIMES, n=args.n)
        rms = lambda d: {t: round(math.sqrt(v), 4) for t, v in d.items()}  # noqa: E731
        print(json.dumps({"task": name, "steps": args.steps, "seconds": round(seconds, 1),
                          "model_rmse": rms(model_mse), "target_rmse": rms(target_mse)}), flush=True)


if __name__ == "__main__":
    main()
