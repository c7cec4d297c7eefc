"""How good is each soft-value estimate SQDF can differentiate? Measured against the exact soft value.

For the toy mixture tasks the soft value V*(x, t) = alpha log E_ref[exp(r(x_0)/alpha) | x_t = x] is exact
(``sqdf.diffusion.soft_value``). At grid steps k of the task's sampler, states x are drawn from the noised target
p*_t (where a converged policy's chains are; ``--states reference`` draws them from the base instead), and each
estimate V_hat is compared with V* on:

* value: the bias mean(V_hat - V*) and the centred RMSE (the offset does not move the policy; the shape does);
* gradient (what SQDF's update follows): relative squared error E|g - g*|^2 / E|g*|^2 and the mean cosine.

Estimates: r(x0_hat) for the x0 estimators tweedie, ode (10 DDIM steps) and consistency (the task's distilled
model), the same scaled by the paper's discount gamma^(T-1-k) (gamma from ``--gamma``), and the multi-sample value
alpha log mean_j exp(r(x0_j)/alpha) over M short reference chains (``--mc``, M:steps pairs), and the learned
critic V_phi of finished `value=critic` SQDF runs (``--critic-runs DIR,...``: the critic of each run's newest
checkpoint, on the run's task). Writes a markdown table per task to stdout and ``--out``.

    python benchmarks/soft_value_study.py --tasks gmm1,gmm2,mix25to9,gaussian --n 1024 --out runs/soft-value-study.md \
        --critic-runs runs/bench/runs/gmm1/sqdf/seed0,runs/bench/runs/gmm2/sqdf/seed0
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

from sqdf.diffusion.estimators import make_estimator, reference_chain_x0
from sqdf.diffusion.policy import DiffusionPolicy
from sqdf.training.run_setup import make_task

STEPS = (10, 20, 30, 40, 50, 60, 70, 80, 90, 99)


def build(task_name: str):
    task = make_task(task_name)
    schedule = task.make_schedule()
    reference = task.build_reference(schedule)
    policy = DiffusionPolicy(task.build_policy_model(reference), schedule, task.sample_shape, reference=reference)
    policy.requires_grad_(False)
    return task, policy


def states_at(task, policy, k: int, n: int, which: str, seed: int) -> torch.Tensor:
    """n states at grid step k: x_t = s x0 + n eps with x0 from the target (or the base)."""
    g = torch.Generator().manual_seed(seed + 1000 * k)
    source = task.target_mixture if which == "target" else task.base
    x0 = source.sample(n, g)
    s, nz = float(policy._signal[k]), float(policy._noise[k])
    return (s * x0 + nz * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


def value_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    v = fn(x)
    (g,) = torch.autograd.grad(v.sum(), x)
    return v.detach().double(), g.detach().double()


def compare(v, g, v_star, g_star) -> dict:
    diff = v - v_star
    cos = torch.nn.functional.cosine_similarity(g, g_star, dim=1, eps=1e-12)
    return {"bias": float(diff.mean()), "rmse": float((diff - diff.mean()).pow(2).mean().sqrt()),
            "grad_rel": float((g - g_star).pow(2).sum(1).mean() / g_star.pow(2).sum(1).mean().clamp(min=1e-30)),
            "cos": float(cos.mean())}


def load_critics(dirs) -> dict[str, list]:
    """task name -> [(label, CriticValue)] from the newest checkpoints of finished value=critic SQDF runs."""
    from sqdf.training.checkpoint import load_latest_checkpoint
    from sqdf.training.saved_runs import load_run

    out: dict[str, list] = {}
    for run_dir in dirs:
        run = load_run(run_dir)
        _, state, _ = load_latest_checkpoint(run_dir)
        run.method.load_state_dict(state["method"])
        label = f"critic ({os.path.basename(os.path.dirname(os.path.dirname(run_dir.rstrip('/'))))}/" \
                f"{os.path.basename(run_dir.rstrip('/'))}, iteration {run.iteration})"
        out.setdefault(run.task_name, []).append((label, run.method.value))
    return out


def estimates(task, policy, k: int, gamma: float, mc: list[tuple[int, int]], seed: int, critics=()):
    """name -> fn(x) [B] of V_hat at grid step k."""
    out = {}
    for label, critic in critics:
        t_k = policy._timesteps[k]
        out[label] = (lambda critic: lambda x: critic.net(x, t_k.expand(x.shape[0]), None,
                                                          critic.estimator(policy, x, k, None)))(critic)
    t_max = policy.num_steps
    for name in ("tweedie", "ode", "consistency"):
        kwargs = {"num_steps": 10} if name == "ode" else {}
        est = make_estimator(name, **kwargs)
        out[name] = (lambda est: lambda x: task.reward(est(policy, x, k)))(est)
    discount = gamma ** (t_max - k)  # a pair of step k-1 lands at k: weight gamma^(T-1-(k-1))
    out[f"{gamma:g}^n tweedie (paper)"] = lambda x: discount * out["tweedie"](x)
    for m, steps in mc:
        def mc_value(x, m=m, steps=steps):
            g = torch.Generator().manual_seed(seed + 7 * k + m)
            rep = x.repeat_interleave(m, 0)
            noises = [torch.randn(rep.shape, generator=g) for _ in range(steps - 1)]
            r = task.reward(reference_chain_x0(policy, rep, k, None, steps, noises)).reshape(x.shape[0], m)
            return task.alpha * (torch.logsumexp(r / task.alpha, 1) - math.log(m))
        out[f"mc M={m} S={steps}"] = mc_value
    return out


def study(task_name: str, n: int, which: str, gamma: float, mc, seed: int, log, critics=(), only=()) -> str:
    task, policy = build(task_name)
    policy.attach_consistency_model(task.consistency_model())
    rows: dict[str, dict[int, dict]] = {}
    mags = {}
    for k in STEPS:
        x = states_at(task, policy, k, n, which, seed)
        t = policy._timesteps[k].expand(n)
        v_star, g_star = value_and_grad(lambda z: task.soft_value(z.double(), t).float(), x)
        mags[k] = float(g_star.norm(dim=1).mean())
        for name, fn in estimates(task, policy, k, gamma, mc, seed, critics).items():
            if only and not name.startswith(tuple(only)):
                continue
            v, g = value_and_grad(fn, x)
            rows.setdefault(name, {})[k] = compare(v, g, v_star, g_star)
        log(f"{task_name}: step {k} done")
    ts = [int(policy._timesteps[k]) for k in STEPS]
    head = "| estimate | " + " | ".join(f"k={k} (t={t})" for k, t in zip(STEPS, ts)) + " |"
    sep = "| --- |" + " ---: |" * len(STEPS)
    lines = [f"### {task_name} (alpha {task.alpha:g}, T = {policy.num_steps}, {n} states from p{'*' if which == 'target' else '_ref'}_t)",
             "", "Gradient: relative squared error E|g - g*|^2 / E|g*|^2 (mean cosine).", "", head, sep,
             "| mean abs g* | " + " | ".join(f"{mags[k]:.3g}" for k in STEPS) + " |"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[k]['grad_rel']:.3g} ({cells[k]['cos']:+.2f})" for k in STEPS)
                     + " |")
    lines += ["", "Value: centred RMSE of V_hat - V* [bias].", "", head, sep]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{cells[k]['rmse']:.3g} [{cells[k]['bias']:+.2g}]" for k in STEPS)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="gmm1,gmm2,mix25to9,gaussian")
    p.add_argument("--n", type=int, default=1024, help="states per grid step")
    p.add_argument("--states", choices=("target", "reference"), default="target")
    p.add_argument("--gamma", type=float, default=0.96, help="the paper variant's discount (gmm1's tuned 0.96)")
    p.add_argument("--mc", default="4:5,16:10", help="M:steps of the multi-sample values, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--critic-runs", default="", help="finished value=critic SQDF run folders, comma-separated")
    p.add_argument("--only", default="", help="report only the estimates whose names start with these, e.g. critic")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mc = [tuple(int(v) for v in item.split(":")) for item in args.mc.split(",") if item]
    start = time.time()
    parts = [f"`python benchmarks/soft_value_study.py {' '.join(argv or sys.argv[1:])}`\n",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n"]
    critics = load_critics([d for d in args.critic_runs.split(",") if d])
    for name in args.tasks.split(","):
        parts.append(study(name, args.n, args.states, args.gamma, mc, args.seed, lambda m: print(m, file=sys.stderr),
                           critics.get(name, ()), [s for s in args.only.split(",") if s]))
    parts.append(f"({time.time() - start:.0f} s)\n")
    text = "\n".join(parts)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
