"""Seconds per training iteration and peak GPU memory of SQDF, DDPO and AlignProp on Stable Diffusion 1.5.

    python benchmarks/sd_speed.py --out BENCH.md                      # random SD1.5 architecture (GPU)
    python benchmarks/sd_speed.py --model DIR --reward-weights DIR    # real SD1.5 + aesthetic weights
    python benchmarks/sd_speed.py --tiny --steps 2 --iters 1 --warmup 0 --batch 2   # CPU smoke run

Every configuration (method x gradient checkpointing) is a fresh ``Trainer`` of the sd15-aesthetic task built
and run exactly as ``sqdf train`` builds and runs it (its presets apply), with equal settings for every method:
``--batch`` chains per iteration, LoRA rank 4, ``--steps`` sampler steps, ``--mixed-precision`` through accelerate,
and one gradient step per iteration (SQDF: train_batch_size = batch, replay_ratio 1; DDPO: one inner epoch, one
minibatch; AlignProp: one step by construction). What one iteration does for each method is written above the
table. Without ``--model`` the pipeline is SD1.5's architecture with random weights
(``sqdf.sd.random_models``, written once into ``--cache``): the same time and memory per call as the real model,
meaningless images. The reward is the aesthetic predictor (CLIP ViT-L/14 vision tower + MLP), random unless
``--reward-weights`` is given.

Timing: ``method.train_iteration`` (and, for the sampling column, ``Trainer._rollout``) is wrapped with
``time.perf_counter`` and, on CUDA, ``torch.cuda.synchronize()`` on both sides; ``Trainer.train()`` drives the
loop, so its evaluations (at the start and the end), the final checkpoint and the LoRA export are not timed. The
first ``--warmup`` iterations are not timed either. Peak memory is ``torch.cuda.max_memory_allocated`` (and
``max_memory_reserved``), reset before every iteration; the reported value is the largest over all iterations and
includes what stays resident (weights, optimizer state, SQDF's replay buffer). A configuration that runs out of
GPU memory is reported as OOM and the next one starts from freed memory. The markdown table (with the command,
the machine, the versions and the date) is printed and appended to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

TASK = "sd15-aesthetic"
METHODS = ("sqdf", "ddpo", "alignprop")
GIB = 1024**3
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")  # allocation failures that surface as plain RuntimeErrors


@dataclass
class Result:
    method: str
    ckpt: bool
    status: str = "ok"  # 'ok', 'OOM' or 'failed'
    times: list[float] = field(default_factory=list)  # seconds of each timed iteration
    sampling: list[float] = field(default_factory=list)  # seconds of the rollout inside each timed iteration
    peak_alloc: float | None = None  # bytes
    peak_reserved: float | None = None
    notes: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a local SD1.5 diffusers folder (default: SD1.5's architecture "
                   "with random weights, written once into --cache)")
    p.add_argument("--reward-weights", default=None, help="aesthetic reward folder (clip/ + MLP file; default: "
                   "random weights of the same architecture)")
    p.add_argument("--tiny", action="store_true", help="the tiny random sd15 pipeline and tiny aesthetic reward "
                   "(a CPU smoke run)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "sqdf", "bench"),
                   help="where the random models are written once")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=4, help="method.batch_size (chains per iteration per process)")
    p.add_argument("--steps", type=int, default=50, help="task.num_inference_steps")
    p.add_argument("--iters", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    p.add_argument("--model-dtype", default="auto", choices=("auto", "float32", "bf16", "fp16"),
                   help="task.model_dtype of the frozen weights (auto: the mixed-precision dtype, float32 without)")
    p.add_argument("--grad-ckpt", default="both", choices=("both", "on", "off"))
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--resolution", type=int, default=None, help="task.resolution (default: the model's own)")
    p.add_argument("--alignprop-k", default="T", help="AlignProp's backprop window: 'T' (every step; the longest "
                   "window of its K ~ U{1..T}, default), an integer K, or 'random' (the method's own draw)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append the markdown table to this file")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: {unknown} not among {list(METHODS)}")
    for name in ("batch", "steps", "iters", "lora_rank"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.alignprop_k not in ("T", "random"):
        try:
            if int(args.alignprop_k) < 1:
                raise ValueError
        except ValueError:
            p.error("--alignprop-k must be 'T', 'random' or an integer >= 1")
    return args


# ---- environment ---------------------------------------------------------------------------------------------
def resolve_environment(args) -> dict:
    """Device, effective mixed precision and model dtype, model and reward folders, and notes on fallbacks."""
    notes = []
    cuda_ok = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_ok:
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda_ok) else "cpu"
    mp = args.mixed_precision
    if device == "cpu" and mp != "no":
        notes.append(f"CPU run: --mixed-precision {mp} fell back to 'no' (float32)")
        mp = "no"
    dtype = args.model_dtype
    if dtype == "auto":
        dtype = {"bf16": "bf16", "fp16": "fp16", "no": "float32"}[mp]
    model, reward = args.model, args.reward_weights
    if args.tiny:
        from sqdf.sd.pipelines import tiny_pipeline_path
        from sqdf.sd.tiny import write_tiny_reward_weights

        model = model or tiny_pipeline_path("sd15", os.path.join(args.cache, "tiny"))
        reward = reward or write_tiny_reward_weights("aesthetic", os.path.join(args.cache, "tiny-rewards"))
        model_desc = "tiny random sd15 pipeline (sqdf.sd.tiny)" if args.model is None else f"`{model}`"
        reward_desc = "tiny random aesthetic reward" if args.reward_weights is None else f"`{reward}`"
    else:
        from sqdf.sd.random_models import write_random_aesthetic, write_random_sd15_pipeline

        if model is None:
            print(f"[sd_speed] random SD1.5 architecture in {args.cache} (written once, ~2 GB)", flush=True)
            model = write_random_sd15_pipeline(os.path.join(args.cache, "random-sd15"), seed=0)
            model_desc = "SD1.5 architecture with random weights (sqdf.sd.random_models, float16 on disk)"
        else:
            model_desc = f"`{model}`"
        if reward is None:
            reward = write_random_aesthetic(os.path.join(args.cache, "random-aesthetic"), seed=0)
            reward_desc = "aesthetic predictor architecture (CLIP ViT-L/14 vision + MLP) with random weights"
        else:
            reward_desc = f"aesthetic, `{reward}`"
    return {"device": device, "mixed_precision": mp, "model_dtype": dtype, "model": model, "reward": reward,
            "model_desc": model_desc, "reward_desc": reward_desc, "notes": notes}


def machine_description(device: str) -> str:
    cores = os.cpu_count()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.get_device_name(0)} ({props.total_memory / GIB:.1f} GiB), CUDA {torch.version.cuda}, "
                f"{cores} CPU cores")
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU only: {cpu}, {cores} cores ({torch.get_num_threads()} torch threads), no GPU"


def versions() -> str:
    import accelerate
    import diffusers
    import peft
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")


# ---- one configuration ---------------------------------------------------------------------------------------
def alignprop_window(args) -> tuple[int, int | None] | None:
    """(min_k, max_k) for AlignProp, or None to keep the method's own K ~ U{min_k..max_k}."""
    if args.alignprop_k == "random":
        return None
    k = args.steps if args.alignprop_k == "T" else min(int(args.alignprop_k), args.steps)
    return k, k


def build_config(args, env: dict, method: str, ckpt: bool):
    """The RunConfig of one configuration: the task's presets for the method, then the benchmark's settings."""
    from sqdf.training.run_setup import default_config

    config = default_config(method, TASK)
    settings = {
        "trainer.steps": args.warmup + args.iters, "trainer.seed": args.seed, "trainer.device": env["device"],
        "trainer.mixed_precision": env["mixed_precision"], "trainer.gradient_accumulation_steps": 1,
        "trainer.eval_samples": args.batch, "trainer.eval_every": 0, "trainer.eval_every_queries": 0,
        "trainer.max_queries": 0, "trainer.checkpoint_every": 10**9, "trainer.keep_checkpoints": 1,
        "trainer.log_every": 1, "trainer.plots": False, "trainer.tensorboard": False, "trainer.progress": False,
        "task.model": env["model"], "task.reward": "aesthetic", "task.reward_weights": env["reward"],
        "task.num_inference_steps": args.steps, "task.lora_rank": args.lora_rank,
        "task.model_dtype": env["model_dtype"], "task.gradient_checkpointing": ckpt,
        "task.resolution": args.resolution, "method.batch_size": args.batch,
    }
    if method == "sqdf":
        settings.update({"method.train_batch_size": args.batch, "method.replay_ratio": 1})
        if config.method.buffer_size < args.batch:
            settings["method.buffer_size"] = args.batch
    elif method == "ddpo":
        settings.update({"method.num_inner_epochs": 1, "method.num_minibatches": 1})
    elif method == "alignprop":
        settings["method.grad_checkpointing"] = ckpt
        window = alignprop_window(args)
        if window is not None:
            settings.update({"method.min_k": window[0], "method.max_k": window[1]})
    for key, value in settings.items():
        config.set(key, value, raw=False)
    return config


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in OOM_MESSAGES)


def run_one(args, env: dict, method: str, ckpt: bool) -> Result:
    """Build a fresh Trainer for (method, ckpt), run warmup + iters iterations through Trainer.train() with timed
    iteration calls, and return the timings; the Trainer is gone (and its memory freed) when this returns."""
    from sqdf.training.trainer import Trainer

    cuda = env["device"] == "cuda"
    res = Result(method, ckpt)
    state = {"phase": "building the Trainer", "rollout": 0.0, "iteration": 0}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out_dir = tempfile.mkdtemp(prefix=f"sd_speed_{method}_")
    trainer = None
    try:
        trainer = Trainer(TASK, method, build_config(args, env, method, ckpt), out_dir)
        params = sum(p.numel() for p in trainer.method.parameters())
        res.notes.append(f"{params / 1e6:.2f}M LoRA params")
        train_iteration, rollout = trainer.method.train_iteration, trainer._rollout

        def timed_rollout(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = rollout(*a, **kw)
            sync()
            state["rollout"] += time.perf_counter() - t0
            return out

        def timed_iteration(ctx):
            i = state["iteration"]
            state["phase"] = f"iteration {i + 1}"
            state["rollout"] = 0.0
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            stats = train_iteration(ctx)
            sync()
            seconds = time.perf_counter() - t0
            if cuda:
                alloc, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
                res.peak_alloc = max(res.peak_alloc or 0, alloc)
                res.peak_reserved = max(res.peak_reserved or 0, reserved)
            if i >= args.warmup:
                res.times.append(seconds)
                res.sampling.append(state["rollout"])
            print(f"[sd_speed] {method} ckpt={'on' if ckpt else 'off'} iteration {i + 1}"
                  f"{' (warmup)' if i < args.warmup else ''}: {seconds:.3f} s"
                  + (f", peak {res.peak_alloc / GIB:.2f} GiB" if cuda else ""), flush=True)
            state["iteration"] = i + 1
            state["phase"] = "the final evaluation (untimed)" if i + 1 == args.warmup + args.iters else \
                f"after iteration {i + 1}"
            return stats

        trainer._rollout = timed_rollout  # the loop builds each IterationContext from these attributes
        trainer.method.train_iteration = timed_iteration
        state["phase"] = "the first evaluation (untimed)"
        trainer.train()
        buffer = getattr(trainer.method, "buffer", None)
        if buffer is not None and getattr(buffer, "states", None) is not None:
            s = buffer.states
            res.notes.append(f"replay buffer {s.numel() * s.element_size() / GIB:.2f} GiB "
                             f"({s.shape[0]} chains x {s.shape[1]} states, {str(s.dtype).replace('torch.', '')}, "
                             f"on {s.device.type})")
    except Exception as exc:  # noqa: BLE001 - one configuration's failure must not stop the others
        done = len(res.times) == args.iters
        if is_oom(exc):
            before = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
            msg = f"OOM in {state['phase']}" + (f" ({before:.1f} GiB allocated at the peak before it)" if cuda else "")
            res.status = "ok" if done else "OOM"
        else:
            traceback.print_exc()
            msg = f"{type(exc).__name__} in {state['phase']}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            res.status = "ok" if done else "failed"
        res.notes.append(msg)
        print(f"[sd_speed] {method} ckpt={'on' if ckpt else 'off'}: {msg}", flush=True)
    finally:
        trainer = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            left = torch.cuda.memory_allocated() / GIB
            if left > 0.05:
                print(f"[sd_speed] note: {left:.2f} GiB still allocated after freeing the Trainer", flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return res


# ---- report ---------------------------------------------------------------------------------------------------
def iteration_descriptions(args, env: dict) -> list[str]:
    """What one training iteration does for each method, with this run's numbers."""
    from sqdf.training.run_setup import default_config

    B, T = args.batch, args.steps
    min_k = default_config("alignprop", TASK).method.min_k  # the method's own lower end of K
    out = []
    for method in args.methods:
        cfg = build_config(args, env, method, False).method
        if method == "sqdf":
            out.append(
                f"**sqdf**: a rollout of {B} chains x {T} steps without gradients (per step a policy and a reference "
                f"guided UNet call, each a CFG batch of {2 * B}) + VAE decode and reward of the {B} samples; then "
                f"{cfg.replay_ratio} gradient step on {cfg.train_batch_size} (chain, step) pairs drawn from the replay "
                f"buffer (capacity {cfg.buffer_size} chains, {cfg.sampling}): per pair a policy step with gradients, a "
                f"reference step, a reference Tweedie x0 estimate (gradients through the state), and VAE decode + "
                f"reward of the estimate with gradients.")
        elif method == "ddpo":
            chunk = cfg.transition_chunk if cfg.transition_chunk > 0 else B * T
            chunk = min(chunk, B * T)
            out.append(
                f"**ddpo**: the same rollout as SQDF's; then {cfg.num_inner_epochs} inner epoch x "
                f"{cfg.num_minibatches} minibatch = 1 PPO gradient step on all {B} x {T} = {B * T} transitions, "
                f"scored {chunk} at a time ({-(-B * T // chunk)} guided policy UNet call(s) with gradients, CFG "
                f"batches of {2 * chunk}, one backward pass each, gradients summed); no VAE or reward gradients.")
        else:
            window = alignprop_window(args)
            k = (f"the last K = {window[0]} with gradients (K fixed: the method draws K ~ U{{{min_k}..T}} per "
                 f"iteration by default, so this is its longest window)" if window and window[0] == T else
                 f"the last K = {window[0]} with gradients" if window else
                 f"the last K ~ U{{{cfg.min_k}..{cfg.max_k or 'T'}}} with gradients (drawn per iteration)")
            kl = ("no KL term (kl_weight 0: no reference calls)" if cfg.kl_weight == 0
                  else f"a KL term (kl_weight {cfg.kl_weight}: a reference call per step)")
            out.append(
                f"**alignprop**: no separate rollout: {B} chains x {T} guided policy steps (CFG batch {2 * B}), "
                f"{k}, then VAE decode + reward with gradients and 1 gradient step; {kl}.")
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render(args, env: dict, argv: list[str], results: list[Result]) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cuda = env["device"] == "cuda"
    ckpt_modes = {"both": "off and on", "on": "on", "off": "off"}[args.grad_ckpt]
    resolution = args.resolution or "the model's own"
    lines = [
        f"## Stable Diffusion 1.5 training speed ({now})",
        "",
        f"Command: `python benchmarks/sd_speed.py {shlex.join(argv)}`",
        "",
        f"Machine: {machine_description(env['device'])}; {versions()}.",
        "",
        f"Model: {env['model_desc']}; reward: {env['reward_desc']}. Task {TASK} (its presets apply), "
        f"resolution {resolution}, {args.steps} sampler steps, batch {args.batch} chains "
        f"per iteration (1 process), LoRA rank {args.lora_rank}, mixed precision {env['mixed_precision']}, frozen "
        f"weights {env['model_dtype']}, gradient checkpointing {ckpt_modes}.",
        "",
    ]
    for note in env["notes"]:
        lines += [f"Note: {note}.", ""]
    lines += ["One iteration (each method takes one gradient step per iteration):", ""]
    lines += [f"- {d}" for d in iteration_descriptions(args, env)]
    lines += [
        "",
        "Grad ckpt on: task.gradient_checkpointing (UNet and VAE blocks recompute their activations in the backward "
        "pass), and for alignprop also method.grad_checkpointing (each sampler step's UNet call is recomputed).",
        "",
        f"Timing: a fresh Trainer per row, driven by Trainer.train(); only the method.train_iteration calls are timed "
        f"(time.perf_counter{', torch.cuda.synchronize() before and after' if cuda else ''}), after {args.warmup} "
        f"untimed warmup iteration(s); s/it is the mean of {args.iters} timed iteration(s), min-max beside it. The "
        f"Trainer's evaluations ({args.batch} chains at the start and the end), the final checkpoint and the LoRA "
        f"export are not timed. Rollout s/it: the part of s/it spent in the no-gradient rollout (sampling and "
        f"reward; sqdf and ddpo). Peak memory: "
        + ("torch.cuda.max_memory_allocated / max_memory_reserved, reset before each iteration, largest over all "
           "iterations (resident weights, optimizer state and replay buffer included)."
           if cuda else "n/a on CPU."),
        "",
        "| method | grad ckpt | s/it | min-max s | rollout s/it | peak allocated GiB | peak reserved GiB | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        ckpt = "on" if r.ckpt else "off"
        note = "; ".join(r.notes).replace("|", "/")
        if r.status != "ok":
            tag = "OOM" if r.status == "OOM" else "failed"
            lines.append(f"| {r.method} | {ckpt} | {tag} | {tag} | {tag} | {tag if cuda else 'n/a'} | "
                         f"{tag if cuda else 'n/a'} | {note} |")
            continue
        mean = sum(r.times) / len(r.times)
        sampling = sum(r.sampling) / len(r.sampling) if r.method != "alignprop" else None
        lines.append(
            f"| {r.method} | {ckpt} | {mean:.3f} | {min(r.times):.3f}-{max(r.times):.3f} | "
            f"{'—' if sampling is None else f'{sampling:.3f}'} | "
            f"{_fmt(r.peak_alloc / GIB) if r.peak_alloc is not None else 'n/a'} | "
            f"{_fmt(r.peak_reserved / GIB) if r.peak_reserved is not None else 'n/a'} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    env = resolve_environment(args)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.grad_ckpt]
    results = []
    for method in args.methods:
        for ckpt in modes:
            print(f"[sd_speed] {method}, gradient checkpointing {'on' if ckpt else 'off'}", flush=True)
            results.append(run_one(args, env, method, ckpt))
    table = render(args, env, argv, results)
    print("\n" + table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        separate = os.path.exists(args.out) and os.path.getsize(args.out) > 0
        with open(args.out, "a") as fh:
            fh.write(("\n" if separate else "") + table)
    failed = [r for r in results if r.status == "failed"]
    bad_times = [r for r in results if r.status == "ok" and not all(math.isfinite(t) and t > 0 for t in r.times)]
    return 1 if failed or bad_times else 0


if __name__ == "__main__":
    sys.exit(main())
