"""How much of the data's variance each sampler keeps: exact final-marginal errors for Gaussian data.

    python benchmarks/sampler_marginals.py --steps 10,20,28,50,100 --data-var 1.0 [--out runs/sampler_marginals.md]

For data N(0, c I) and the exact denoiser every sampler step is linear, so the variance of the final state is a
closed form (``sqdf.diffusion.marginals``; tested against Monte Carlo through the policy). Each cell is
v_T / (signal_T^2 c + noise_T^2) - 1 at the grid's end: the step's own discretization error, with no network error.
Negative: the sampler ends with too little variance. Rows are the schedules the tasks use.
"""

from __future__ import annotations

import argparse

from sqdf.diffusion.marginals import gaussian_marginal_error
from sqdf.diffusion.schedule import FlowMatchSchedule, NoiseSchedule, ScheduleConfig

SD_BETAS = ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)
COSINE = ScheduleConfig(kind="cosine")


def samplers():
    """(label, schedule factory of T) for every sampler a task uses, at eta 0 and 1 where that applies."""
    for eta in (1.0, 0.0):
        yield f"VP linear (toys), DDIM eta {eta:g}", lambda n, e=eta: NoiseSchedule(ScheduleConfig(), n, e)
        yield f"VP cosine (digits), DDIM eta {eta:g}", lambda n, e=eta: NoiseSchedule(COSINE, n, e)
        yield f"VP scaled-linear (SD1.5/SDXL), DDIM eta {eta:g}", lambda n, e=eta: NoiseSchedule(SD_BETAS, n, e)
    for eta in (1.0, 0.0):
        yield f"flow shift 3 (SD3), DDIM eta {eta:g}", lambda n, e=eta: FlowMatchSchedule(n, e, 3.0, step="ddim")
    for level in (0.7, 1.0):
        yield f"flow shift 3 (SD3), SDE a = {level:g}", lambda n, a=level: FlowMatchSchedule(n, a, 3.0, step="sde")


def table(steps: list[int], data_var: float) -> str:
    lines = [f"| sampler (data variance {data_var:g}) | " + " | ".join(f"T={n}" for n in steps) + " |",
             "| --- | " + " | ".join("---:" for _ in steps) + " |"]
    for label, make in samplers():
        cells = [f"{100 * gaussian_marginal_error(make(n), data_var):+.1f}%" for n in steps]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="10,20,28,50,100", help="comma-separated step counts")
    p.add_argument("--data-var", default="1.0", help="comma-separated data variances c per dimension")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args()
    steps = [int(v) for v in args.steps.split(",")]
    text = "\n\n".join(table(steps, float(c)) for c in args.data_var.split(","))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
