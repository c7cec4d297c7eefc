"""SQDF on digits with the consistency-model x0 estimator against Tweedie's, over seeds; prints a markdown table.

    python benchmarks/digits_estimators.py --seeds 0,1 --out runs/digits-estimators [--set trainer.steps=100]

Each run is exactly `sqdf train digits --seed S --set method.estimator=E --out OUT/E-sS [--set ...]`, so any row
can be reproduced alone. Columns: mean reward, path KL, objective J and regret J* - J (J* by Monte Carlo over base
samples), fraction of samples the classifier reads as the target digit, Frechet distance to held-out target
digits and feature diversity (with the exact target's values for reference), wall seconds on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform

from run_cache import train_or_load

COLUMNS = ("reward_mean", "path_kl", "objective", "regret", "target_accuracy", "frechet", "diversity",
           "optimal_frechet", "optimal_diversity", "wall_seconds")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--estimators", default="consistency,tweedie")
    p.add_argument("--out", default="runs/digits-estimators")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    rows = []
    for est in args.estimators.split(","):
        for seed in args.seeds.split(","):
            out = os.path.join(args.out, f"{est}-s{seed}")
            summary = train_or_load(["train", "digits", "--seed", seed, "--set", f"method.estimator={est}"], out,
                                    args.overrides)
            rows.append({"estimator": est, "seed": seed, **summary})
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; overrides: {args.overrides or 'none'}\n")
    print("| estimator | seed | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in COLUMNS]
        print(f"| {r['estimator']} | {r['seed']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
